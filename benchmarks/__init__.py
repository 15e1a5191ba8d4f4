"""Benchmarks of embedding-dissect against the baselines users reach for (see README.md here)."""
