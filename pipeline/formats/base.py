"""What every weight-format reader returns, and the shared choice of the embedding tensor."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.core.errors import DissectError
from pipeline.formats.checks import quoted

# Names under which common architectures store the token-embedding matrix, most common first.
KNOWN_EMBEDDING_KEYS: tuple[str, ...] = (
    "tok_embeddings.weight",  # Meta reference checkpoints
    "model.embed_tokens.weight",  # Llama, Mistral, Qwen, Gemma in transformers
    "embed_tokens.weight",
    "embeddings.word_embeddings.weight",  # BERT-family base models
    "bert.embeddings.word_embeddings.weight",
    "transformer.wte.weight",  # GPT-2
    "wte.weight",
    "gpt_neox.embed_in.weight",  # Pythia
    "model.decoder.embed_tokens.weight",  # OPT
    "transformer.word_embeddings.weight",  # Bloom
    "word_embeddings.weight",
    "token_embd.weight",  # GGUF
)


@dataclass(frozen=True)
class SourceRecord:
    """Where an embedding matrix came from."""

    files: tuple[Path, ...]
    tensor_key: str
    source_dtype: str
    shape: tuple[int, int]


@dataclass(frozen=True)
class Embedding:
    """A float32 matrix [vocab, dim] (memory-mapped where the format allows) and its origin."""

    matrix: np.ndarray = field(repr=False)
    source: SourceRecord


def choose_tensor_key(available: list[str], requested: str | None, where: Path) -> str:
    """The embedding tensor's name: ``requested`` if given, else the first known name present.

    When nothing fits, the message lists the closest names so the user can set ``tensor``.
    """
    if requested is not None:
        if requested in available:
            return requested
        raise DissectError(
            f"tensor {requested!r} is not in {where}; {closest_hint(available, requested)}"
        )
    for key in KNOWN_EMBEDDING_KEYS:
        if key in available:
            return key
    raise DissectError(f"no token-embedding tensor found in {where}; {closest_hint(available, 'embed_tokens.weight')}")


def closest_hint(available: list[str], wanted: str) -> str:
    embedding_like = [name for name in available if "emb" in name.lower() or "wte" in name.lower()]
    closest = embedding_like or difflib.get_close_matches(wanted, available, n=5, cutoff=0.0)
    if not closest:
        return "the file holds no tensors"
    names = ", ".join(quoted(name) for name in closest[:5])
    return f"closest names: {names}; set `tensor:` in the model's config to the right one"


def require_2d(shape: tuple[int, ...], key: str, where: Path) -> tuple[int, int]:
    if len(shape) != 2 or min(shape) <= 0:
        raise DissectError(
            f"tensor {quoted(key)} in {where} has shape {quoted(list(shape))}, not [vocab, dim]; set `tensor:` to the embedding matrix"
        )
    return int(shape[0]), int(shape[1])


def single_file(folder: Path, suffix: str) -> Path:
    """The one ``*<suffix>`` file in a model folder; none or several is a :class:`DissectError`."""
    candidates = sorted(folder.glob(f"*{suffix}"))
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise DissectError(f"no {suffix} file in {folder}; point `source.path` at the {suffix} file")
    raise DissectError(f"{folder} holds several {suffix} files; point `source.path` at one of them")
