"""Small artifacts for tests, written by the production writers so they cannot drift from them.

Each builder writes what a stage would write (schema, provenance, layout) from a matrix
the test chose, so the answer of the stage under test can be worked out by hand.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.core.hashing import matrix_sha256
from pipeline.core.parquet import vector_array, with_provenance, write_batches, write_table
from pipeline.quant import SCHEMES
from pipeline.quant.layout import quant_schema, quant_write_options, record_batch
from pipeline.stages.extract import embeddings_schema


def write_embeddings(
    path: Path,
    matrix: np.ndarray,
    tokens: list[str | None] | None = None,
    *,
    token_ids: np.ndarray | None = None,
    row_group_size: int = 4096,
    source_dtype: str = "float32",
    keys: list[str | None] | None = None,
    kinds: list[str] | None = None,
) -> Path:
    """``embeddings.parquet`` as extract lays it out: ids, token texts (``t<id>`` by default), vectors.

    ``keys`` default to the texts, ``kinds`` to normal (padding where the text is None).
    """
    ids = np.arange(len(matrix), dtype=np.int32) if token_ids is None else np.asarray(token_ids, np.int32)
    texts = [f"t{i}" for i in ids] if tokens is None else tokens
    keys = texts if keys is None else keys
    kinds = ["padding" if text is None else "normal" for text in texts] if kinds is None else kinds
    provenance = {
        "stage": "extract",
        "model": Path(path).parent.name,
        "source_dtype": source_dtype,
        "shape": list(matrix.shape),
        "matrix_sha256": matrix_sha256(matrix),
    }
    schema = with_provenance(embeddings_schema(matrix.shape[1]), provenance)
    table = pa.Table.from_arrays(
        [pa.array(ids, pa.int32()), pa.array(texts, pa.string()), pa.array(keys, pa.string()), pa.array(kinds, pa.string()),
         pa.nulls(len(ids), pa.binary()), vector_array(matrix)],
        schema=schema,
    )
    write_batches(path, schema, [table], row_group_size=row_group_size)
    return Path(path)


def write_words(model_dir: Path, matrix: np.ndarray, entries: list[tuple[str, str, list[int]]], pooling: str = "mean") -> Path:
    """words.parquet with the words stage's columns; each vector is the mean of its tokens' rows."""
    dim = matrix.shape[1]
    vectors = np.stack([matrix[ids].mean(axis=0) for _, _, ids in entries]).astype(np.float32) if entries else np.zeros((0, dim), np.float32)
    table = pa.table(
        {
            "word": pa.array([word for word, _, _ in entries], pa.string()),
            "variant": pa.array([variant for _, variant, _ in entries], pa.string()),
            "token_ids": pa.array([ids for _, _, ids in entries], pa.list_(pa.int32())),
            "tokens": pa.array([[f"t{i}" for i in ids] for _, _, ids in entries], pa.list_(pa.string())),
            "n_tokens": pa.array([len(ids) for _, _, ids in entries], pa.int32()),
            "split": pa.array([len(ids) > 1 for _, _, ids in entries], pa.bool_()),
            "pooling": pa.array([pooling] * len(entries), pa.string()),
            "vector": vector_array(vectors),
        }
    )
    path = Path(model_dir) / "words.parquet"
    write_table(path, table, {"stage": "words", "params": {"words": {"list": sorted({w for w, _, _ in entries}), "pooling": pooling}}})
    return path


def write_quantized(path: Path, embeddings: Path, matrix: np.ndarray, scheme_name: str) -> np.ndarray:
    """``quant/<scheme>.parquet`` through the quant layout's writers; returns the decoded matrix."""
    scheme = SCHEMES[scheme_name]().fit(matrix)
    encoded = scheme.encode(matrix)
    provenance = {"stage": "quantize", "input": {"path": str(embeddings), "matrix_sha256": matrix_sha256(matrix)},
                  "dequantize": scheme.recipe(matrix.shape[1])}
    schema = with_provenance(quant_schema(scheme, matrix.shape[1]), provenance)
    batch = record_batch(np.arange(len(matrix), dtype=np.int32), encoded, schema)
    write_batches(path, schema, [batch], **quant_write_options(schema))
    return scheme.decode(encoded)


def write_params(root: Path, models: list[str], **sections: dict) -> Path:
    """``root/params.yaml`` naming ``models`` (each a placeholder safetensors folder) plus ``sections``."""
    import yaml

    params = {"models": {name: {"format": "safetensors", "source": {"path": f"/nonexistent/{name}"}} for name in models}, **sections}
    path = Path(root) / "params.yaml"
    path.write_text(yaml.safe_dump(params), encoding="utf-8")
    return path


def sentencepiece_tokenizer(unused: int = 3):
    """A SentencePiece BPE vocabulary with byte fallback, like Llama 2's or Gemma's, in miniature.

    Ids: 0 <unk>, 1 <s>, 2 </s>, 3 <0x0A>, 4 <0xE2>, 5 <0xF3>, 6 "\\n" (a piece whose text the
    byte <0x0A> shares), 7 ▁Hello, 8 Hello, 9 ▁, 10 lo, then ``unused`` placeholders
    ``<unusedN>`` (added, not special, as Gemma's tokenizer.json has them).
    """
    import tokenizers
    from tokenizers import AddedToken, decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x0A>": 3, "<0xE2>": 4, "<0xF3>": 5, "\n": 6, "▁Hello": 7, "Hello": 8, "▁": 9, "lo": 10}
    vocab.update({f"<unused{i}>": 11 + i for i in range(unused)})
    tok = tokenizers.Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.add_tokens([AddedToken(f"<unused{i}>", special=False, normalized=False) for i in range(unused)])
    return tok

