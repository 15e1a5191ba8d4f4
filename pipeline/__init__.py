"""embedding-dissect: the token-embedding layer of an LLM as queryable, rebuildable artifacts."""

__version__ = "0.1.0"
