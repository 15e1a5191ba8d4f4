"""Tokenizer loading and conversion (tokenizer.json, tiktoken, GGUF) and readable token pieces."""
