"""Shared engines of the stages: artifact paths and settings, Parquet I/O, kNN, PCA, memory helpers."""
