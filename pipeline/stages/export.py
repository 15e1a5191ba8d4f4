"""export stage: the whole vocabulary in files that other tools open directly.

For model ``<name>`` it reads ``artifacts/<name>/embeddings.parquet`` and writes:

* ``artifacts/<name>/projector/`` for the TensorBoard Embedding Projector:

  - ``vectors.tsv``: one row per token in id order, the floats tab-separated, no header,
    each written with 9 significant digits (``%.9g``), which round-trips float32 exactly;
  - ``metadata.tsv``: a header row ``token_id<TAB>token<TAB>kind`` then one row per token
    (``kind`` as in embeddings.parquet: normal, byte, special, unused, padding, so the
    projector can colour or search by it). With more than one column the projector reads
    the first row as the header. In ``token``, every
    space is shown as ``␣`` (``␣Hello`` and ``Hello`` are different tokens; a label hides a
    leading space), and a backslash, tab, newline and carriage return are written ``\\\\``, ``\\t``, ``\\n``,
    ``\\r`` (the projector splits rows on newlines and columns on tabs, and nothing
    unescapes them), a padding row's token is empty. Every row starts with the token id,
    so no row is blank: the projector skips blank lines, which would shift every later
    label (a token such as ``"\\n\\n"`` or ``" "`` would otherwise make one);
  - ``projector_config.pbtxt`` (TensorBoard's ``ProjectorConfig`` in protobuf text
    format: ``tensor_name``, ``tensor_path``, ``metadata_path``, ``tensor_shape``) and
    ``projector_config.json`` (the standalone projector's ``?config=`` file, same content).

  The projector served by TensorBoard fetches at most 100000 points of a tensor (its
  ``LIMIT_NUM_POINTS``) and silently keeps the first 100000 rows. A vocabulary above
  ``export.projector_max_rows`` (100000) is therefore also written as consecutive shards
  ``shards/vectors_<first>-<last>.tsv`` (+ metadata) of at most that many rows, each its
  own embedding in the config, so every token is shown and none is cut; ``vectors.tsv`` /
  ``metadata.tsv`` keep the whole vocabulary in one file for tools without the cap (the
  standalone projector's "Load" reads the file in the browser). Vocabularies up to the
  cap (SmolLM2: 49152, MiniLM: 30522) need no shards.

* ``artifacts/<name>/atlas.parquet`` for embedding-atlas-style viewers
  (``embedding-atlas atlas.parquet --text text --x x --y y --neighbors neighbors``):
  ``token_id int32`` (= the row index, which the viewer's neighbour ids refer to),
  ``text string`` (the token with every space shown as ``␣``), ``token string`` (exact, as
  in embeddings.parquet), ``kind string``, ``x``, ``y`` float32 (the first two principal components,
  :func:`pipeline.core.pca.fit_pca`, as in ``pca.parquet``), ``neighbors
  struct<ids: list<int32>, distances: list<float32>>``: the ``export.neighbors_k`` nearest
  other tokens by cosine (exact, :func:`pipeline.core.knn.knn_graph`), nearest first, with
  cosine distance 1 - cosine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.cli import Stage
from pipeline.core.errors import DissectError, run_stage
from pipeline.core.io import atomic_path, output_set, write_bytes_atomic
from pipeline.core.knn import MAX_BLOCK_ROWS, MAX_K, Neighbors, iter_blocks, knn_graph, unit_rows
from pipeline.core.params import model_paths
from pipeline.core.paths import ModelPaths
from pipeline.core.settings import as_params, from_section, list_of, setting, string, whole_number
from pipeline.core.parquet import derived_provenance, read_matrix, write_table
from pipeline.core.progress import progress_bar

STAGE = "export"
TSV_BLOCK_ROWS = 4096
FLOAT_FORMAT = "%.9g"  # 9 significant digits: every float32 reads back exactly
METADATA_COLUMNS = ("token_id", "token", "kind")
TENSORBOARD_POINT_LIMIT = 100000
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
VISIBLE_SPACE = "\u2423"  # "␣": " Hello" and "Hello" are different tokens, and must look different
_VISIBLE = str.maketrans({" ": VISIBLE_SPACE})


@dataclass(frozen=True)
class ExportSettings:
    neighbors_k: int = setting(10, whole_number(1, MAX_K))
    projector_max_rows: int = setting(TENSORBOARD_POINT_LIMIT, whole_number(1, 10_000_000))
    block_rows: int = setting(4096, whole_number(1, MAX_BLOCK_ROWS))
    # The models exported: DVC runs the stage once per entry (params, not an input).
    models: list[str] = setting([], list_of(string(), unique=True), recorded=False)


# --------------------------------------------------------------------------------------
# TensorBoard projector


def visible(text: str | None) -> str | None:
    """``text`` with every space shown as ``␣`` (a viewer's label would hide a leading one)."""
    return None if text is None else text.translate(_VISIBLE)


def escape_tsv(text: str | None) -> str:
    """A metadata cell: spaces shown as ``␣``, backslash, tab, newline and CR escaped; padding (None) empty."""
    return "" if text is None else text.translate(_VISIBLE).translate(_ESCAPES)


def metadata_lines(token_ids: range, tokens: list[str | None], kinds: list[str]) -> str:
    """Metadata rows (no header) for ``token_ids``, each ending in a newline."""
    return "".join(f"{i}\t{escape_tsv(tokens[i])}\t{escape_tsv(kinds[i])}\n" for i in token_ids)


def write_vectors(handle: IO[bytes], rows: np.ndarray) -> None:
    """``rows`` [n, dim] as tab-separated floats, one line per row."""
    np.savetxt(handle, rows, fmt=FLOAT_FORMAT, delimiter="\t", newline="\n")


@dataclass(frozen=True)
class Shard:
    start: int
    stop: int  # exclusive

    @property
    def suffix(self) -> str:
        return f"{self.start:06d}-{self.stop - 1:06d}"


def shards(rows: int, max_rows: int) -> list[Shard]:
    """Consecutive row ranges of at most ``max_rows``; none when one file is within the cap."""
    if rows <= max_rows:
        return []
    return [Shard(start, min(start + max_rows, rows)) for start in range(0, rows, max_rows)]


def projector_embeddings(name: str, shape: tuple[int, int], parts: list[Shard]) -> list[dict[str, Any]]:
    """The config's embeddings: the whole file, or one per shard when the vocabulary exceeds the cap."""
    if not parts:
        return [{"tensor_name": name, "tensor_path": "vectors.tsv", "metadata_path": "metadata.tsv", "tensor_shape": list(shape)}]
    return [
        {
            "tensor_name": f"{name} [{part.start}:{part.stop}]",
            "tensor_path": f"shards/vectors_{part.suffix}.tsv",
            "metadata_path": f"shards/metadata_{part.suffix}.tsv",
            "tensor_shape": [part.stop - part.start, shape[1]],
        }
        for part in parts
    ]


def pbtxt(embeddings: list[dict[str, Any]]) -> str:
    """TensorBoard's ProjectorConfig in protobuf text format."""
    blocks = []
    for entry in embeddings:
        lines = [f"  tensor_name: {json.dumps(entry['tensor_name'])}",
                 f"  tensor_path: {json.dumps(entry['tensor_path'])}",
                 f"  metadata_path: {json.dumps(entry['metadata_path'])}"]
        lines += [f"  tensor_shape: {size}" for size in entry["tensor_shape"]]
        blocks.append("embeddings {\n" + "\n".join(lines) + "\n}\n")
    return "".join(blocks)


def standalone_config(embeddings: list[dict[str, Any]]) -> dict[str, Any]:
    """The standalone projector's JSON config (camelCase keys)."""
    return {"embeddings": [{"tensorName": e["tensor_name"], "tensorPath": e["tensor_path"], "metadataPath": e["metadata_path"],
                            "tensorShape": e["tensor_shape"]} for e in embeddings]}


def write_projector(
    folder: Path, name: str, matrix: np.ndarray, tokens: list[str | None], kinds: list[str], max_rows: int
) -> list[dict[str, Any]]:
    """Every file of the projector export; returns the config's embeddings."""
    header = "\t".join(METADATA_COLUMNS) + "\n"
    parts = shards(len(matrix), max_rows)
    with atomic_path(folder / "vectors.tsv") as vectors_tmp, atomic_path(folder / "metadata.tsv") as meta_tmp:
        with open(vectors_tmp, "wb") as vectors, open(meta_tmp, "w", encoding="utf-8", newline="\n") as meta:
            meta.write(header)
            with progress_bar(total=len(matrix), desc="projector TSV", unit="rows") as bar:
                for start, block in iter_blocks(matrix, TSV_BLOCK_ROWS):
                    write_vectors(vectors, block)
                    meta.write(metadata_lines(range(start, start + len(block)), tokens, kinds))
                    bar.update(len(block))
    for part in parts:
        with atomic_path(folder / "shards" / f"vectors_{part.suffix}.tsv") as tmp, open(tmp, "wb") as handle:
            for start, block in iter_blocks(matrix[part.start : part.stop], TSV_BLOCK_ROWS):
                write_vectors(handle, block)
        text = header + metadata_lines(range(part.start, part.stop), tokens, kinds)
        write_bytes_atomic(folder / "shards" / f"metadata_{part.suffix}.tsv", text.encode("utf-8"))
    embeddings = projector_embeddings(name, matrix.shape, parts)
    write_bytes_atomic(folder / "projector_config.pbtxt", pbtxt(embeddings).encode("utf-8"))
    config = json.dumps(standalone_config(embeddings), indent=2, ensure_ascii=False) + "\n"
    write_bytes_atomic(folder / "projector_config.json", config.encode("utf-8"))
    return embeddings


# --------------------------------------------------------------------------------------
# embedding-atlas Parquet


NEIGHBORS_TYPE = pa.struct([("ids", pa.list_(pa.int32())), ("distances", pa.list_(pa.float32()))])


def neighbors_array(found: Neighbors) -> pa.StructArray:
    """``{ids, distances}`` per row from a kNN result (unfilled slots dropped)."""
    valid = found.valid()  # [n, k]
    counts = valid.sum(axis=1)
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    ids = pa.array(found.ids[valid].astype(np.int32))
    distances = pa.array((1.0 - found.cosines[valid]).astype(np.float32))
    return pa.StructArray.from_arrays(
        [pa.ListArray.from_arrays(offsets, ids), pa.ListArray.from_arrays(offsets, distances)], fields=list(NEIGHBORS_TYPE)
    )


def atlas_table(tokens: pa.Array, kinds: pa.Array, xy: np.ndarray, found: Neighbors) -> pa.Table:
    """token_id, text (spaces shown), token (exact), kind, x, y, neighbors; ``xy`` [vocab, 2]."""
    return pa.table({
        "token_id": pa.array(np.arange(len(xy), dtype=np.int32)),
        "text": pa.array([visible(text) for text in tokens.to_pylist()], pa.string()),
        "token": tokens,
        "kind": kinds,
        "x": pa.array(xy[:, 0].astype(np.float32)),
        "y": pa.array(xy[:, 1].astype(np.float32)),
        "neighbors": neighbors_array(found),
    })


def pca_xy(matrix: np.ndarray) -> np.ndarray:
    """The first two principal coordinates [vocab, 2] (the pca stage's fit)."""
    from pipeline.core.pca import fit_pca

    if matrix.shape[1] < 2:
        raise DissectError(f"the matrix has {matrix.shape[1]} dimension; a 2-D projection needs at least 2")
    return fit_pca(matrix, n_components=2).transform(matrix)


# --------------------------------------------------------------------------------------
# Stage


def run(paths: ModelPaths, settings: ExportSettings) -> dict[str, Any]:
    """The stage on one model; returns a summary of what it wrote."""
    matrix = read_matrix(paths.embeddings)  # [vocab, dim]
    columns = pq.read_table(paths.embeddings, columns=["token", "kind"])
    token_array = columns.column("token").combine_chunks()
    kind_array = columns.column("kind").combine_chunks()
    tokens = token_array.to_pylist()
    with output_set():
        projector = write_projector(paths.projector, paths.name, matrix, tokens, kind_array.to_pylist(), settings.projector_max_rows)
        table = atlas_table(token_array, kind_array, pca_xy(matrix),
                            knn_graph(unit_rows(matrix), settings.neighbors_k, settings.block_rows, "atlas neighbours"))
        write_table(paths.atlas, table, derived_provenance(STAGE, paths.name, paths.embeddings, {"export": as_params(settings)}))
    return {"rows": len(matrix), "dim": int(matrix.shape[1]), "projector_embeddings": projector}


main = Stage(STAGE, "MODEL", model_paths, from_section(ExportSettings, STAGE), run).main


if __name__ == "__main__":
    run_stage(main)
