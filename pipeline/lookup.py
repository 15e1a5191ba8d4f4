"""Looking text up in an embedding matrix: the operation an embedding layer performs.

* :func:`batch_lookup` turns texts into a padded ``[batch, seq, dim]`` array. Padding is
  marked by the mask (and by token id -1), never by a real token id such as 0, and padded
  positions hold zeros, so nothing can mistake padding for a token.
* :func:`word_vectors` gives one vector per text, pooling the rows of a text that splits
  into several tokens (mean, first or last); the ``words`` stage is built on it.
* :func:`load_embedding_layer` loads ``embeddings.parquet`` as a frozen
  ``torch.nn.Embedding`` whose forward returns exactly the Parquet rows.

Texts are encoded with :func:`pipeline.tokenizers.load.word_token_ids` unless special tokens are
asked for, so BOS/EOS never count as part of a word.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple, Sequence, get_args

import numpy as np
import tokenizers

from pipeline.core.errors import DissectError
from pipeline.core.parquet import read_matrix
from pipeline.tokenizers.load import word_token_ids

if TYPE_CHECKING:
    import torch

Pooling = Literal["mean", "first", "last"]
POOLINGS: tuple[str, ...] = get_args(Pooling)
PADDING_ID = -1


class Batch(NamedTuple):
    """A padded batch of looked-up texts."""

    vectors: np.ndarray  # [batch, seq, dim] float32; zeros where mask is False
    mask: np.ndarray  # [batch, seq] bool; True on real tokens
    token_ids: np.ndarray  # [batch, seq] int64; PADDING_ID where mask is False


@dataclass(frozen=True)
class WordVector:
    """One text, its tokens and its pooled vector."""

    text: str
    token_ids: list[int]
    vector: np.ndarray  # [dim] float32


def encode(tokenizer: tokenizers.Tokenizer, text: str, add_special_tokens: bool = False) -> list[int]:
    """The token ids of ``text``; with ``add_special_tokens`` the model's BOS/EOS around them."""
    if not add_special_tokens:
        return word_token_ids(tokenizer, text)
    encoding = tokenizer.encode(text, add_special_tokens=True)
    return [index for index, keep in zip(encoding.ids, encoding.attention_mask) if keep]


def pad_token_ids(id_lists: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(token_ids [batch, seq] int64 padded with PADDING_ID, mask [batch, seq] bool)."""
    seq = max((len(ids) for ids in id_lists), default=0)
    token_ids = np.full((len(id_lists), seq), PADDING_ID, np.int64)  # [batch, seq]
    mask = np.zeros((len(id_lists), seq), bool)  # [batch, seq]
    for row, ids in enumerate(id_lists):
        token_ids[row, : len(ids)] = ids
        mask[row, : len(ids)] = True
    return token_ids, mask


def gather_rows(matrix: np.ndarray, token_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``matrix`` rows at ``token_ids`` [batch, seq] -> [batch, seq, dim] float32, zeros where masked out."""
    vectors = np.zeros((*token_ids.shape, matrix.shape[1]), np.float32)  # [batch, seq, dim]
    vectors[mask] = matrix[token_ids[mask]]
    return vectors


def check_in_range(texts: Sequence[str], id_lists: Sequence[Sequence[int]], rows: int) -> None:
    for text, ids in zip(texts, id_lists):
        outside = [index for index in ids if not 0 <= index < rows]
        if outside:
            raise DissectError(
                f"{text!r} encodes to token id {outside[0]}, outside the embedding's {rows} rows; "
                "the tokenizer does not belong to this matrix: rebuild both with the extract stage"
            )


def batch_lookup(
    matrix: np.ndarray, tokenizer: tokenizers.Tokenizer, texts: Sequence[str], add_special_tokens: bool = False
) -> Batch:
    """Embed ``texts`` as a padded batch: ``(vectors [batch, seq, dim], mask [batch, seq], token_ids [batch, seq])``.

    ``seq`` is the longest text's token count.
    """
    id_lists = [encode(tokenizer, text, add_special_tokens) for text in texts]
    check_in_range(texts, id_lists, matrix.shape[0])
    token_ids, mask = pad_token_ids(id_lists)
    return Batch(gather_rows(matrix, token_ids, mask), mask, token_ids)


def pool(vectors: np.ndarray, mask: np.ndarray, pooling: str) -> np.ndarray:
    """One vector per sequence [batch, dim] float32 from ``vectors`` [batch, seq, dim] under ``mask``.

    Every sequence must hold at least one token. The mean is taken in float64, so a
    one-token sequence gives its row back exactly.
    """
    if pooling not in POOLINGS:
        raise DissectError(f"pooling {pooling!r} is unknown; use one of {', '.join(POOLINGS)}")
    lengths = mask.sum(axis=1)  # [batch]
    if (lengths == 0).any():
        raise ValueError("every sequence needs at least one token to be pooled")
    rows = np.arange(len(lengths))
    if pooling == "first":
        return vectors[rows, 0].copy()
    if pooling == "last":
        return vectors[rows, lengths - 1].copy()
    # Padded positions hold zeros, so the plain sum over seq is the sum over real tokens.
    totals = vectors.sum(axis=1, dtype=np.float64)  # [batch, dim]
    return (totals / lengths[:, None]).astype(np.float32)


def word_vectors(
    matrix: np.ndarray, tokenizer: tokenizers.Tokenizer, texts: Sequence[str], pooling: str = "mean"
) -> list[WordVector]:
    """One pooled vector per text (no special tokens); a text with no tokens is an error."""
    vectors, mask, token_ids = batch_lookup(matrix, tokenizer, texts)
    for text, row_mask in zip(texts, mask):
        if not row_mask.any():
            raise DissectError(f"{text!r} encodes to no tokens at all; remove it from the word list or spell it differently")
    pooled = pool(vectors, mask, pooling) if len(texts) else np.zeros((0, matrix.shape[1]), np.float32)
    return [
        WordVector(text, token_ids[row, mask[row]].tolist(), pooled[row])
        for row, text in enumerate(texts)
    ]


def load_embedding_layer(embeddings_path: Path | str) -> "torch.nn.Embedding":
    """``embeddings.parquet`` as a frozen ``torch.nn.Embedding``: forward(ids) == the Parquet rows."""
    import torch  # only callers of this function pay for torch's import

    matrix = read_matrix(embeddings_path)
    if not matrix.flags.writeable:
        # torch may not share a read-only Arrow buffer; a copy keeps the layer safe to use.
        matrix = matrix.copy()
    return torch.nn.Embedding.from_pretrained(torch.from_numpy(matrix), freeze=True)
