"""export stage: files read back with the consumers' own parsing rules."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.paths import ModelPaths
from pipeline.core.settings import read_section
from pipeline.stages.export import ExportSettings, escape_tsv, neighbors_array, run, write_projector
from pipeline.core.knn import brute_force_neighbors, unit_rows
from pipeline.report.sections import export_section
from pipeline.stages.compare import load_exports


def projector_lines(path) -> list[str]:
    """Rows as the projector's TSV parser sees them: split on newlines, blank lines skipped."""
    return [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def projector_vectors(path) -> np.ndarray:
    """vectors.tsv as the projector reads it: each row tab-separated floats, no header."""
    return np.array([[float(value) for value in line.split("\t")] for line in projector_lines(path)], np.float32)


def projector_metadata(path) -> tuple[list[str], list[list[str]]]:
    """metadata.tsv as the projector reads it: a first row with a tab is the header."""
    lines = projector_lines(path)
    assert "\t" in lines[0]
    return lines[0].split("\t"), [line.split("\t") for line in lines[1:]]


def pbtxt_embeddings(text: str) -> list[dict]:
    """The embeddings of a ProjectorConfig in protobuf text format (the fields used here)."""
    found = []
    for block in re.findall(r"embeddings \{(.*?)\n\}", text, re.S):
        entry: dict = {"tensor_shape": []}
        for key, value in re.findall(r"^\s*(\w+): (.+)$", block, re.M):
            if key == "tensor_shape":
                entry[key].append(int(value))
            else:
                entry[key] = json.loads(value)
        found.append(entry)
    return found


TRICKY = ["tab\there", "line\nbreak", " ", "\n\n", "back\\slash", "cr\r", None, " Hello", "plain"]


def test_escape_keeps_one_line_per_token():
    escaped = [escape_tsv(text) for text in TRICKY]
    assert all("\t" not in cell and "\n" not in cell and "\r" not in cell for cell in escaped)
    assert escaped[0] == "tab\\there" and escaped[4] == "back\\\\slash" and escaped[6] == ""
    assert escaped[2] == "␣" and escaped[7] == "␣Hello" and escaped[8] == "plain"  # a leading space shows


def test_projector_files_read_back(tmp_path):
    rng = np.random.default_rng(0)
    matrix = (rng.normal(size=(len(TRICKY), 5)) * 10.0 ** rng.integers(-8, 3, size=(len(TRICKY), 5))).astype(np.float32)
    kinds = ["normal"] * (len(TRICKY) - 3) + ["padding", "normal", "special"]
    write_projector(tmp_path, "toy", matrix, TRICKY, kinds, max_rows=100)
    assert np.array_equal(projector_vectors(tmp_path / "vectors.tsv"), matrix)  # exact float32 round trip
    header, rows = projector_metadata(tmp_path / "metadata.tsv")
    assert header == ["token_id", "token", "kind"] and len(rows) == len(matrix)
    assert [row[2] for row in rows] == kinds and rows[6][1:] == ["", "padding"]
    assert [int(row[0]) for row in rows] == list(range(len(matrix)))
    assert rows[1][1] == "line\\nbreak" and rows[3][1] == "\\n\\n" and rows[2][1] == "␣"
    (entry,) = pbtxt_embeddings((tmp_path / "projector_config.pbtxt").read_text())
    assert entry == {"tensor_name": "toy", "tensor_path": "vectors.tsv", "metadata_path": "metadata.tsv",
                     "tensor_shape": [len(TRICKY), 5]}
    standalone = json.loads((tmp_path / "projector_config.json").read_text())
    assert standalone["embeddings"][0]["tensorPath"] == "vectors.tsv"


def test_vocabulary_beyond_the_point_cap_is_sharded(tmp_path):
    matrix = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    tokens = [f"t{i}" for i in range(7)]
    write_projector(tmp_path, "toy", matrix, tokens, ["normal"] * 7, max_rows=3)
    entries = pbtxt_embeddings((tmp_path / "projector_config.pbtxt").read_text())
    assert [e["tensor_shape"] for e in entries] == [[3, 3], [3, 3], [1, 3]]
    parts = [projector_vectors(tmp_path / e["tensor_path"]) for e in entries]
    assert np.array_equal(np.concatenate(parts), matrix)  # every row, once, in order
    labels = [row[1] for e in entries for row in projector_metadata(tmp_path / e["metadata_path"])[1]]
    assert labels == tokens
    assert np.array_equal(projector_vectors(tmp_path / "vectors.tsv"), matrix)  # and the whole file


def test_neighbors_column_matches_exact_search():
    rng = np.random.default_rng(1)
    unit = unit_rows(rng.normal(size=(50, 6)).astype(np.float32))
    found = brute_force_neighbors(unit, 4)
    column = neighbors_array(found).to_pylist()
    assert column[0]["ids"] == found.ids[0].tolist()
    assert np.allclose(column[0]["distances"], 1 - found.cosines[0])
    assert all(len(row["ids"]) == 4 for row in column)


def test_smollm2_end_to_end(smollm2_artifacts):
    summary = run(ModelPaths.for_artifacts(smollm2_artifacts), ExportSettings(neighbors_k=5))
    folder = smollm2_artifacts / "projector"
    assert summary["projector_embeddings"][0]["tensor_shape"] == [49152, 576]
    lines = projector_lines(folder / "vectors.tsv")
    assert len(lines) == 49152 and len(lines[9906].split("\t")) == 576
    header, rows = projector_metadata(folder / "metadata.tsv")
    assert header == ["token_id", "token", "kind"] and len(rows) == 49152 and all(len(row) == 3 for row in rows)
    columns = pq.read_table(smollm2_artifacts / "embeddings.parquet", columns=["token", "kind"]).to_pydict()
    assert [row[1] for row in rows] == [escape_tsv(text) for text in columns["token"]]
    assert [row[2] for row in rows] == columns["kind"] and rows[0][2] == "special"
    atlas = pq.read_table(smollm2_artifacts / "atlas.parquet")
    assert atlas.column_names == ["token_id", "text", "token", "kind", "x", "y", "neighbors"]
    assert atlas.schema.field("neighbors").type == pa.struct([("ids", pa.list_(pa.int32())), ("distances", pa.list_(pa.float32()))])
    hello = atlas.filter(pa.compute.equal(atlas.column("text"), "␣Hello")).to_pylist()[0]
    assert hello["token"] == " Hello" and hello["kind"] == "normal"
    assert len(hello["neighbors"]["ids"]) == 5 and hello["neighbors"]["distances"] == sorted(hello["neighbors"]["distances"])
    import duckdb
    import polars

    assert duckdb.sql(f"SELECT count(*) FROM '{smollm2_artifacts / 'atlas.parquet'}'").fetchall()[0][0] == 49152
    assert polars.read_parquet(smollm2_artifacts / "atlas.parquet").height == 49152
    assert "atlas.parquet" in export_section(smollm2_artifacts.name, load_exports(smollm2_artifacts))


@pytest.mark.parametrize("bad", [{"neighbors_k": 0}, {"projector_max_rows": 0}])
def test_settings_mistakes(bad):
    from pipeline.core.errors import DissectError
    with pytest.raises(DissectError, match=f"export.{next(iter(bad))} must be a whole number"):
        read_section(ExportSettings, bad, "export")
