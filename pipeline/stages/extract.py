"""extract stage: the embedding matrix of one model as ``artifacts/<name>/embeddings.parquet``.

Reads ``models/<name>/manifest.json`` (written by ``fetch``), checks the files are the
bytes it hashed (:func:`check_sources`), opens the weights once with the format's reader, loads the tokenizer, checks that they fit each other, and writes:

* ``embeddings.parquet``: ``token_id int32``, ``token string`` (the piece as readable text,
  null for padding rows beyond the tokenizer), ``token_key string`` (unique: the text, but
  ``<0xNN>`` for byte-fallback pieces), ``kind string`` (normal, byte, special, unused,
  padding), ``token_bytes binary`` (the raw bytes of pieces that are not valid UTF-8 on
  their own, else null), ``vector fixed_size_list<float32>[dim]``; the layout and the
  provenance in the file metadata are documented in :mod:`pipeline.core.parquet`;
* ``tokenizer.json``: the tokenizer in Hugging Face's format, so later stages load it fast.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from pipeline.core.cli import Stage
from pipeline.core.errors import DissectError, run_stage
from pipeline.formats import Embedding, read_embedding, weight_files
from pipeline.core.hashing import file_sha256, file_stat, matrix_sha256, spans_sha256
from pipeline.core.io import output_set, write_bytes_atomic
from pipeline.core.parquet import DEFAULT_ROW_GROUP_SIZE, package_record, vector_array, with_provenance, write_batches
from pipeline.core.params import ModelConfig, model_config, model_paths
from pipeline.core.paths import ModelPaths
from pipeline.core.settings import as_params, read_section, setting, whole_number
from pipeline.core.progress import progress_bar

# Vocabularies are padded to a multiple of 64 or 128 rows, sometimes to the next 1024
# (Qwen2.5: 151665 tokens, 151936 rows): more rows without a token than this means the
# tokenizer is not the model's.
MAX_PADDING_ROWS = 1024


@dataclass(frozen=True)
class Vocabulary:
    """The tokenizer's view of the matrix rows: readable text and raw bytes per token id."""

    texts: list[str | None]  # [rows]; None for padding rows the tokenizer never produces
    raw_bytes: list[bytes | None]  # [rows]; set only where the piece is not valid UTF-8 alone
    tokenizer_size: int
    keys: list[str | None]  # [rows]; unique; None for padding rows
    kinds: list[str]  # [rows]; TOKEN_KINDS

    @property
    def padded_rows(self) -> int:
        return len(self.texts) - self.tokenizer_size


def embeddings_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("token_id", pa.int32(), nullable=False),
            pa.field("token", pa.string()),
            pa.field("token_key", pa.string()),
            pa.field("kind", pa.string(), nullable=False),
            pa.field("token_bytes", pa.binary()),
            pa.field("vector", pa.list_(pa.field("element", pa.float32(), nullable=False), dim), nullable=False),
        ]
    )


def vocabulary_for(tokenizer: Any, rows: int, model: str, lender: str | None = None) -> Vocabulary:
    """Align the tokenizer's pieces with ``rows`` matrix rows.

    More rows than tokens is a padded vocabulary (common: sizes rounded up for GPU
    efficiency) and is recorded; more tokens than rows means the tokenizer belongs to
    another model. ``lender`` names the model a borrowed tokenizer comes from.
    """
    from pipeline.tokenizers.load import token_pieces

    pieces = token_pieces(tokenizer)
    which = f"the tokenizer of {model}" + (f" (taken from {lender})" if lender else "")
    fix = (f"{lender}'s vocabulary is not this model's: set models.{model}.tokenizer.from to a model with the same vocabulary"
           if lender else f"the tokenizer belongs to another model: set models.{model}.tokenizer to the model's own")
    if len(pieces) > rows:
        raise DissectError(f"{which} has {len(pieces)} tokens but the embedding has only {rows} rows; {fix}")
    padding = rows - len(pieces)
    if padding > max(MAX_PADDING_ROWS, rows // 64):
        raise DissectError(
            f"{which} has {len(pieces)} tokens for {rows} embedding rows, leaving {padding} rows "
            f"without a token, far more than a padded vocabulary has; {fix}"
        )
    texts = [piece.text for piece in pieces] + [None] * padding
    raw = [piece.raw for piece in pieces] + [None] * padding
    keys = [piece.key for piece in pieces] + [None] * padding
    kinds = [piece.kind for piece in pieces] + ["padding"] * padding
    return Vocabulary(texts=texts, raw_bytes=raw, tokenizer_size=len(pieces), keys=keys, kinds=kinds)


def embedding_batches(matrix: np.ndarray, vocab: Vocabulary, schema: pa.Schema, rows_per_batch: int) -> Iterator[pa.RecordBatch]:
    """Record batches of the table, converted chunk by chunk so memory stays flat."""
    with progress_bar(total=matrix.shape[0], desc="write embeddings.parquet", unit="rows") as bar:
        for start in range(0, matrix.shape[0], rows_per_batch):
            stop = min(start + rows_per_batch, matrix.shape[0])
            columns = [
                pa.array(np.arange(start, stop, dtype=np.int32)),
                pa.array(vocab.texts[start:stop], type=pa.string()),
                pa.array(vocab.keys[start:stop], type=pa.string()),
                pa.array(vocab.kinds[start:stop], type=pa.string()),
                pa.array(vocab.raw_bytes[start:stop], type=pa.binary()),
                vector_array(matrix[start:stop]).cast(schema.field("vector").type),
            ]
            yield pa.RecordBatch.from_arrays(columns, schema=schema)
            bar.update(stop - start)


def provenance(name: str, manifest: dict, embedding: Embedding, vocab: Vocabulary, matrix_hash: str, params: dict) -> dict:
    # The manifest lists every file fetched (weights and tokenizer); the reader says which it read.
    read = {Path(p).resolve() for p in embedding.source.files}
    files_by_path = {f["path"]: f for f in manifest["files"]}
    source_files = [f for f in manifest["files"] if Path(f["path"]).resolve() in read] or manifest["files"]
    tokenizer = manifest["tokenizer"]
    return {
        "stage": "extract",
        "model": name,
        "format": manifest["format"],
        "source_files": source_files,
        "tensor_key": embedding.source.tensor_key,
        "source_dtype": embedding.source.source_dtype,
        "shape": list(embedding.source.shape),
        "matrix_sha256": matrix_hash,
        "tokenizer": {
            "kind": tokenizer["kind"],
            "path": tokenizer["path"],
            "sha256": files_by_path.get(tokenizer["path"], {}).get("sha256"),
            "vocab_size": vocab.tokenizer_size,
            "padded_rows": vocab.padded_rows,
            **({"from": tokenizer["from"]} if tokenizer.get("from") else {}),
        },
        "params": params,
        "package": package_record(),
    }


@dataclass(frozen=True)
class ExtractOptions:
    # Rows per Parquet row group: small enough for readers to parallelise.
    row_group_size: int = setting(DEFAULT_ROW_GROUP_SIZE, whole_number(1, 1 << 20))
    # zstd level of embeddings.parquet.
    compression_level: int = setting(3, whole_number(1, 22))


@dataclass(frozen=True)
class ExtractSettings:
    model: ModelConfig  # models.<name>
    options: ExtractOptions  # the extract section


def read_settings(params: dict[str, Any], name: str | None) -> ExtractSettings:
    return ExtractSettings(model_config(params, str(name)), read_section(ExtractOptions, params.get("extract"), "extract"))


def read_manifest(paths: ModelPaths) -> dict:
    try:
        return json.loads(paths.manifest.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DissectError(f"{paths.manifest} is missing; run the fetch stage first (`dvc repro fetch@{paths.name}`)") from None


def check_sources(paths: ModelPaths, manifest: dict) -> dict[str, dict[str, int]]:
    """Check that the files to be read are the bytes the manifest hashed; returns their stats.

    Cheap when nothing changed: a file whose size and times equal those fetch recorded when
    it hashed it (``paths.hashed``) is trusted; any other is hashed again. A file the reader
    would touch that the manifest does not list (a shard added since) is refused too.
    """
    fix = f"run `dvc repro fetch@{paths.name}` (or `python -m pipeline.stages.fetch {paths.name}`)"
    recorded = _read_hashed(paths.hashed)
    stats = {}
    for entry in manifest["files"]:
        try:
            stat = file_stat(entry["path"])
        except FileNotFoundError:
            raise DissectError(f"{entry['path']} is gone since fetch hashed it; {fix}") from None
        if stat["bytes"] != entry["bytes"]:
            raise DissectError(f"{entry['path']} changed after fetch hashed it ({stat['bytes']} bytes, the manifest says {entry['bytes']}); {fix}")
        if recorded.get(entry["path"]) != {**stat, "sha256": entry["sha256"]} and _sha256_of_entry(entry) != entry["sha256"]:
            raise DissectError(f"{entry['path']} changed after fetch hashed it (its sha256 is not the manifest's); {fix}")
        stats[entry["path"]] = stat
    listed = {Path(entry["path"]).resolve() for entry in manifest["files"]}
    remote = "source" in manifest  # a view of the files fetch read by range: other shards are absent
    for path in weight_files(manifest["format"], Path(manifest["weights"])):
        if remote and not path.exists():
            continue
        if path.resolve() not in listed:
            raise DissectError(f"{path} is read with the model but was not there when fetch hashed the model's files; {fix}")
    return stats


def _sha256_of_entry(entry: dict) -> str:
    """The sha256 the manifest records: of the whole file, or of the byte ranges read."""
    if entry.get("read") == "ranges":
        return spans_sha256(entry["path"], entry["ranges"])
    return file_sha256(entry["path"])


def check_unchanged(paths: ModelPaths, stats: dict[str, dict[str, int]]) -> None:
    """The files read are still as :func:`check_sources` found them (nobody wrote them meanwhile)."""
    for path, stat in stats.items():
        try:
            unchanged = file_stat(path) == stat
        except FileNotFoundError:
            unchanged = False
        if not unchanged:
            raise DissectError(f"{path} changed while extract read it; run `dvc repro fetch@{paths.name}` once nothing writes it")


def _read_hashed(path: Path) -> dict[str, Any]:
    """fetch's stat records, or none (another machine, an older fetch): then every file is hashed."""
    try:
        files = json.loads(path.read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return {}
    return files if isinstance(files, dict) else {}


def run(paths: ModelPaths, settings: ExtractSettings) -> dict:
    """Run the stage for one model; returns the provenance written."""
    from pipeline.tokenizers.load import load_tokenizer

    manifest = read_manifest(paths)
    stats = check_sources(paths, manifest)
    # The weights are read, converted and hashed on a thread of their own (numpy and hashlib
    # release the GIL) while this one builds the tokenizer and its vocabulary, which is Python.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="weights") as weights:
        reading = weights.submit(read_embedding, manifest["format"], Path(manifest["weights"]), settings.model.tensor)
        hashing = weights.submit(lambda: matrix_sha256(reading.result().matrix))
        tokenizer = load_tokenizer(manifest["tokenizer"]["kind"], Path(manifest["tokenizer"]["path"]))
        embedding = reading.result()
        check_unchanged(paths, stats)
        vocab = vocabulary_for(tokenizer, embedding.matrix.shape[0], paths.name, manifest["tokenizer"].get("from"))
        matrix_hash = hashing.result()
    stage_params = {"model": settings.model.weights_entry, "extract": as_params(settings.options)}
    record = provenance(paths.name, manifest, embedding, vocab, matrix_hash, stage_params)

    schema = with_provenance(embeddings_schema(embedding.matrix.shape[1]), record)
    rows_per_group = settings.options.row_group_size
    with output_set():
        write_batches(
            paths.embeddings,
            schema,
            embedding_batches(embedding.matrix, vocab, schema, rows_per_group),
            row_group_size=rows_per_group,
            compression_level=settings.options.compression_level,
        )
        write_bytes_atomic(paths.tokenizer, tokenizer.to_str(pretty=False).encode("utf-8"))
    return record


main = Stage("extract", "MODEL", model_paths, read_settings, run).main


if __name__ == "__main__":
    run_stage(main)
