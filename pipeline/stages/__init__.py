"""One module per DVC stage; each has `run(paths, settings)` and `main` for `python -m pipeline.stages.<stage>`."""
