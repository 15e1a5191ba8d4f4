"""quantize stage: metrics, nearest-neighbour recall, the Parquet layout and its recipe, end to end."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from pipeline.core.paths import ModelPaths
from pipeline.core.settings import read_section
from pipeline.core.parquet import write_in_background
from pipeline.quant import layout
from pipeline.quant.floats import round_to_bf16
from pipeline.quant.recall import Queries, WordQuery
from pipeline.stages import quantize, words
from pipeline.stages.words import WordSettings

from builders import write_embeddings, write_params, write_words
from pipeline.core.errors import run_stage
from pipeline.core.errors import DissectError
from pipeline.core.hashing import matrix_sha256
from pipeline.core.parquet import read_provenance, read_vectors
from pipeline.quant import SCHEMES, Encoded
from pipeline.quant.ggml import ggml_blocks
from pipeline.core.knn import Neighbors, TopK, excluding_own, unit_rows
from pipeline.core.screen import ScreenPrecision
from pipeline.quant.measure import ErrorStats, recall, row_errors

ROOT = Path(__file__).resolve().parent.parent
ALL_SCHEMES = list(SCHEMES)
METRIC_KEYS = {
    "bits_per_weight",
    "recall_k",
    "bytes_on_disk",
    "compression_vs_float32",
    "compression_vs_source",
    "rmse",
    "max_abs_error",
    "snr_db",
    "row_cosine_mean",
    "row_cosine_min",
    "clipped_values",
    "clipped_fraction",
    "tokens_recall_at_k",
    "words_recall_at_k",
    "words_similarity_max_change",
}


def readme_snippet() -> str:
    """The pyarrow + numpy dequantization snippet, exactly as documented (module docstring)."""
    block = layout.__doc__.split("pyarrow and numpy alone::\n\n", 1)[1].split("\n\n", 1)[0]
    return textwrap.dedent(block)


def run_snippet(path: Path) -> np.ndarray:
    code = readme_snippet().replace('"artifacts/smollm2-135m/quant/q4_0.parquet"', repr(str(path)))
    namespace: dict = {}
    exec(code, namespace)  # noqa: S102 - the documented snippet, run as a reader would
    return namespace["matrix"]


def settings(schemes=None, sample_tokens=50, recall_k=5, seed=0) -> dict:
    return {"schemes": ALL_SCHEMES if schemes is None else schemes, "sample_tokens": sample_tokens, "recall_k": recall_k, "seed": seed}


def quantize_run(model_dir: Path, section: dict) -> dict:
    """The stage on ``model_dir`` with ``section`` as params.yaml's quantize section."""
    return quantize.run(ModelPaths.for_artifacts(model_dir), read_section(quantize.QuantizeSettings, section, "quantize"))


def synthetic_model(root: Path, matrix: np.ndarray, source_dtype: str = "float32") -> Path:
    """``artifacts/tiny/`` with embeddings.parquet and a words.parquet of no words."""
    model_dir = root / "artifacts" / "tiny"
    write_embeddings(model_dir / "embeddings.parquet", matrix, source_dtype=source_dtype)
    write_words(model_dir, matrix, [])
    return model_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, np.ndarray, dict]:
    rng = np.random.default_rng(0)
    matrix = (rng.standard_normal((300, 128)) * 0.6).astype(np.float32)  # some values beyond 1.27
    matrix[7] = 0.0  # a zero row: never sampled, cosine 1 with its (zero) copy
    model_dir = synthetic_model(tmp_path_factory.mktemp("tiny"), matrix)
    metrics = quantize_run(model_dir, settings())
    return model_dir, matrix, metrics


# ---------------------------------------------------------------------------------------
# Measures on hand-checkable numbers.


def test_error_stats_by_hand():
    # original (3, 4), restored (3, 3): error (0, -1); rmse sqrt(1/2); SNR 10 log10(25 / 1);
    # cosine 21 / (5 * sqrt(18)).
    stats = ErrorStats()
    stats.add(np.array([[3.0, 4.0]], np.float32), np.array([[3.0, 3.0]], np.float32), clipped=1)
    summary = stats.summary()
    assert summary["rmse"] == pytest.approx(math.sqrt(0.5))
    assert summary["max_abs_error"] == 1.0
    assert summary["snr_db"] == pytest.approx(10 * math.log10(25))
    assert summary["row_cosine_min"] == pytest.approx(21 / (5 * math.sqrt(18)))
    assert summary["clipped_fraction"] == 0.5


def test_error_stats_lossless_has_no_snr():
    stats = ErrorStats()
    stats.add(np.ones((2, 3), np.float32), np.ones((2, 3), np.float32), clipped=0)
    assert stats.summary()["snr_db"] is None and stats.summary()["rmse"] == 0.0


def test_topk_equals_brute_force_across_chunks_and_excludes_self():
    rng = np.random.default_rng(1)
    matrix = rng.standard_normal((1000, 16)).astype(np.float32)
    matrix[3] = 0.0
    query_rows = np.array([0, 5, 999, 500])
    queries = np.concatenate([matrix[query_rows], rng.standard_normal((2, 16)).astype(np.float32)])
    self_rows = np.r_[query_rows, -1, -1]
    top = TopK(unit_rows(queries), 7, excluding_own(self_rows))
    for start in range(0, 1000, 128):
        top.add(start, matrix[start : start + 128])
    found = top.finish()
    cosines = unit_rows(queries).astype(np.float64) @ unit_rows(matrix).astype(np.float64).T  # [q, vocab]
    cosines[np.arange(4), query_rows] = -np.inf
    expected = np.argsort(-cosines, axis=1)[:, :7]
    assert [set(row) for row in found.ids] == [set(row) for row in expected]
    assert (np.diff(found.cosines, axis=1) <= 0).all()


def brute_force_ids(matrix: np.ndarray, queries: np.ndarray, self_rows: np.ndarray, k: int) -> list[set]:
    """Each query's k best rows by float64 cosine; its own row and rows that are not finite excluded."""
    rows = matrix.astype(np.float64)
    finite = np.isfinite(rows).all(axis=1)
    norms = np.linalg.norm(np.where(finite[:, None], rows, 0), axis=1)
    units = np.where(norms[:, None] > 0, rows / np.where(norms > 0, norms, 1)[:, None], 0)
    cosines = queries.astype(np.float64) @ np.where(finite[:, None], units, 0).T  # [q, vocab]
    cosines[:, ~finite] = -np.inf
    own = self_rows >= 0
    cosines[np.flatnonzero(own), self_rows[own]] = -np.inf
    return [set(row) for row in np.argsort(-cosines, axis=1, kind="stable")[:, :k]]


def screened(units, self_rows, k, matrix, step, precision=None) -> tuple[TopK, Neighbors]:
    top = TopK(units, k, excluding_own(self_rows), screen="bfloat16", precision=precision)
    for start in range(0, len(matrix), step):
        top.add(start, matrix[start : start + step])
    return top, top.finish()


@pytest.mark.parametrize("precision", ["native", "float32"])
def test_screened_topk_equals_brute_force(precision):
    rng = np.random.default_rng(4)
    matrix = rng.standard_normal((3000, 48)).astype(np.float32)
    matrix[::101] *= 5  # some structure in the norms
    matrix[10] = 0.0  # a zero row: cosine 0 with everything
    matrix[20, 3] = np.inf  # a row without a direction: never a neighbour
    query_rows = np.array([0, 5, 2999, 1500])
    queries = np.concatenate([matrix[query_rows], rng.standard_normal((2, 48)).astype(np.float32)])
    self_rows = np.r_[query_rows, -1, -1]
    chosen = None if precision == "native" else ScreenPrecision(torch.float32, False, 0.0)
    for step in (256, 3):  # chunks larger than k, and smaller (3 rows, k = 7)
        top, found = screened(unit_rows(queries), self_rows, 7, matrix, step, chosen)
        assert top.bound_held
        assert [set(row) for row in found.ids] == brute_force_ids(matrix, unit_rows(queries), self_rows, 7)
        assert np.all(np.diff(top.scores, axis=1) <= 0)  # best first


def test_screened_candidate_lists_hold_every_row_that_can_beat_what_they_leave_out():
    rng = np.random.default_rng(7)
    matrix = rng.standard_normal((3000, 40)).astype(np.float32)
    query_rows = np.array([2, 999, 2000])
    units = unit_rows(np.concatenate([matrix[query_rows], rng.standard_normal((1, 40)).astype(np.float32)]))
    top = TopK(units, 5, excluding_own(np.r_[query_rows, -1]), screen="bfloat16", keep=60)
    for start in range(0, 3000, 512):
        top.add(start, matrix[start : start + 512])
    top.finish()
    assert top.bound_held
    cosines = units.astype(np.float64) @ unit_rows(matrix.astype(np.float64)).T  # [q, vocab]
    cosines[np.arange(3), query_rows] = -np.inf
    c = top.precision.out
    for q in range(len(units)):
        listed, scores = top.candidate_ids[q], top.candidate_scores[q].astype(np.float64)
        assert len(set(listed)) == 60  # 60 distinct rows
        assert np.all(np.abs(scores - cosines[q, listed]) <= top.candidate_slack[q] + c * np.abs(scores))
        lowest = scores.min()
        left_out = np.setdiff1d(np.arange(3000), listed)
        assert np.all(cosines[q, left_out] <= lowest + c * abs(lowest) + top.candidate_slack[q])
    assert not np.isin(query_rows, top.candidate_ids[:3]).any()  # never a query's own row


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kept_lists_are_each_querys_best_screen_scores_over_every_chunk(dtype):
    from pipeline.core.screen import BoundedScreen, ScreenPrecision

    rng = np.random.default_rng(3)
    # Scores on a coarse grid, so many tie, across a list's lowest score too; -inf marks
    # rows a query may not return.
    scores = np.round(rng.standard_normal((3, 700)) * 4).astype(np.float32) / 8  # [s, rows]
    scores[0, ::7] = -np.inf
    screen = BoundedScreen(unit_rows(rng.standard_normal((3, 8)).astype(np.float32)), 25, ScreenPrecision(dtype, dtype == torch.bfloat16, 0.0))
    for start in range(0, 700, 64):  # the first chunk fills the lists, the others compete for them
        screen.keep_best(torch.from_numpy(scores[:, start : start + 64]).to(dtype), start, np.full(3, 1e-3))
    for q in range(3):
        assert np.array_equal(np.sort(screen.kept_scores[q]), np.sort(scores[q])[-25:])  # the 25 best, ties and all
        assert len(set(screen.kept_ids[q])) == 25
        assert np.array_equal(scores[q, screen.kept_ids[q]], screen.kept_scores[q])  # each id with its own score
    assert np.all(screen.kept_slack == 1e-3)


def test_screened_topk_gives_a_query_without_direction_the_lowest_rows():
    matrix = np.random.default_rng(5).standard_normal((50, 16)).astype(np.float32)
    matrix[1, 0] = np.nan
    queries = np.zeros((2, 16), np.float32)  # every row is at cosine 0 from a zero query
    top, found = screened(queries, np.array([0, -1]), 4, matrix, 16)
    assert top.bound_held
    assert found.ids.tolist() == [[2, 3, 4, 5], [0, 2, 3, 4]]  # never itself (row 0) nor the NaN row


def test_scheme_run_searches_in_float32_when_the_screen_breaks_its_bound(monkeypatch):
    rng = np.random.default_rng(6)
    matrix = rng.standard_normal((2000, 32)).astype(np.float32)
    queries = Queries(np.array([3, 700, 1999]), [WordQuery("w", (7, 11))])
    scheme = SCHEMES["q4_0"]().fit(matrix)
    honest = quantize.SchemeRun(scheme, matrix, queries, 5)
    for _ in honest.batches(layout.quant_schema(scheme, 32)):
        pass
    matmul = torch.matmul
    monkeypatch.setattr(torch, "matmul", lambda a, b, out: matmul(a, b, out=out).mul_(0.5))  # a broken kernel
    broken = quantize.SchemeRun(scheme, matrix, queries, 5)
    for _ in broken.batches(layout.quant_schema(scheme, 32)):
        pass
    assert not broken.top.bound_held  # the screen was not trusted: the engine's float32 search ran
    assert broken.neighbours.tolist() == honest.neighbours.tolist()  # the same exact answer, ties and order


def test_recall_by_hand():
    # query 0 keeps 2 of its 4 neighbours, query 1 all 4: (2/4 + 4/4) / 2 = 0.75
    assert recall(np.array([[1, 2, 3, 4], [5, 6, 7, 8]]), np.array([[1, 2, 9, 10], [8, 7, 6, 5]])) == 0.75
    assert recall(np.empty((0, 4), int), np.empty((0, 4), int)) is None


# ---------------------------------------------------------------------------------------
# The stage on a small synthetic matrix.


def test_snippet_rebuilds_every_scheme_bit_for_bit(tiny):
    model_dir, matrix, _ = tiny
    for name in ALL_SCHEMES:
        scheme = SCHEMES[name]().fit(matrix)
        expected = scheme.decode(scheme.encode(matrix))
        rebuilt = run_snippet(model_dir / "quant" / f"{name}.parquet")
        assert rebuilt.dtype == np.float32 and rebuilt.shape == matrix.shape, name
        assert np.array_equal(rebuilt, expected), name


def test_readme_carries_the_tested_snippet():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme_snippet() in readme


def test_layout_and_provenance(tiny):
    model_dir, matrix, metrics = tiny
    assert sorted(metrics) == sorted(ALL_SCHEMES)
    assert json.loads((model_dir / "quant.json").read_text()) == json.loads(json.dumps(metrics))
    # dim 128: q4_0 packs 128 codes into 64 bytes with 4 block scales, int8_row has 128 bytes and one scale.
    q4 = pq.read_table(model_dir / "quant" / "q4_0.parquet")
    assert q4.schema.field("codes").type == pa.binary(64)
    assert q4.schema.field("scales").type.list_size == 4
    int8 = pq.read_schema(model_dir / "quant" / "int8_row.parquet")
    assert int8.field("codes").type == pa.binary(128) and int8.field("scales").type.list_size == 1
    assert pq.read_schema(model_dir / "quant" / "int8_tensor.parquet").names == ["token_id", "codes"]
    record = read_provenance(model_dir / "quant" / "nf4.parquet")
    assert record["stage"] == "quantize" and record["scheme"] == "nf4" and record["shape"] == [300, 128]
    assert record["input"]["matrix_sha256"] == matrix_sha256(matrix)
    assert record["dequantize"]["lookup"][0] == -1.0 and record["dequantize"]["block"] == 64
    assert record["params"]["quantize"]["schemes"] == ALL_SCHEMES
    for name, values in metrics.items():
        assert set(values) == METRIC_KEYS, name
        assert values["bytes_on_disk"] == (model_dir / "quant" / f"{name}.parquet").stat().st_size


def test_metrics_on_the_synthetic_matrix(tiny):
    _, matrix, metrics = tiny
    beyond = np.count_nonzero((matrix.astype(np.float64) > 1.27) | (matrix.astype(np.float64) < -1.28))
    assert beyond > 0 and metrics["int8_tensor_fixed"]["clipped_values"] == beyond
    assert metrics["int8_tensor_fixed"]["clipped_fraction"] == beyond / matrix.size
    assert metrics["q4_0"]["clipped_values"] > 0
    assert all(metrics[name]["clipped_values"] == 0 for name in ("int8_tensor", "int8_row", "q8_0", "nf4", "fp16", "bf16"))
    rmse = {name: values["rmse"] for name, values in metrics.items()}
    assert rmse["fp16"] < rmse["bf16"] < rmse["int8_row"] < rmse["q4_0"]
    assert metrics["fp16"]["compression_vs_float32"] == 2.0 and metrics["q4_0"]["compression_vs_source"] == 32 / 4.5
    assert metrics["fp16"]["tokens_recall_at_k"] > 0.95
    assert metrics["nf4"]["words_recall_at_k"] is None  # no words configured
    scheme = SCHEMES["q4_0"]()
    restored = scheme.decode(scheme.encode(matrix))
    assert metrics["q4_0"]["max_abs_error"] == float(np.abs(restored - matrix).max())
    assert metrics["q4_0"]["rmse"] == pytest.approx(float(np.sqrt(np.mean((restored.astype(np.float64) - matrix) ** 2))))


def test_codes_are_plain_bytes_under_zstd_and_only_other_columns_carry_statistics(tiny):
    for name in ("int8_row", "q4_0", "fp16", "bf16"):
        group = pq.ParquetFile(tiny[0] / "quant" / f"{name}.parquet").metadata.row_group(0)
        columns = {group.column(i).path_in_schema: group.column(i) for i in range(group.num_columns)}
        codes = columns["codes"]
        assert codes.physical_type == "FIXED_LEN_BYTE_ARRAY" and codes.compression == "ZSTD", name
        assert "PLAIN" in codes.encodings and "RLE_DICTIONARY" not in codes.encodings, name
        assert codes.statistics is None and columns["token_id"].statistics.has_min_max, name
        assert columns["scales.list.element"].statistics.has_min_max if "scales.list.element" in columns else True


def test_codes_are_the_encoded_codes_in_their_dtype(tiny):
    model_dir, matrix, _ = tiny
    for name in ("int8_tensor", "int8_row", "q8_0", "q4_0", "nf4"):
        path = model_dir / "quant" / f"{name}.parquet"
        recipe = read_provenance(path)["dequantize"]
        codes = layout.code_rows(pq.read_table(path), recipe["codes_dtype"])
        scheme = SCHEMES[name]().fit(matrix)
        expected = scheme.encode(matrix).codes
        assert codes.dtype == expected.dtype and np.array_equal(codes, expected), name


def test_duckdb_and_polars_read_the_codes(tiny):
    duckdb = pytest.importorskip("duckdb")
    polars = pytest.importorskip("polars")
    model_dir, matrix, _ = tiny
    path = model_dir / "quant" / "q8_0.parquet"
    assert duckdb.sql(f"SELECT count(*), max(octet_length(codes)), max(len(scales)) FROM '{path}'").fetchall() == [(300, 128, 4)]
    # Polars turns the bytes back into int8 codes, as the module docstring shows.
    frame = polars.read_parquet(path).select(
        polars.col("codes").bin.reinterpret(dtype=polars.Array(polars.Int8, 128), endianness="little"))
    assert np.array_equal(frame["codes"].to_numpy(), SCHEMES["q8_0"]().encode(matrix).codes)


def test_code_rows_of_a_slice_are_its_own_rows():
    codes = np.arange(24, dtype=np.int8).reshape(6, 4)  # [6 rows, 4 codes]
    column = pa.Array.from_buffers(pa.binary(4), 6, [None, pa.py_buffer(codes)])
    table = pa.table({"codes": column}).slice(2, 3)
    assert np.array_equal(layout.code_rows(table, "int8"), codes[2:5])
    halves = pa.table({"codes": pa.Array.from_buffers(pa.binary(8), 3, [None, pa.py_buffer(codes)])}).slice(1, 2)
    assert np.array_equal(layout.code_rows(halves, "<u2"), codes.reshape(3, 8)[1:].view("<u2"))


def test_fp16_and_bf16_files_hold_16_bit_codes(tiny):
    # A file holds the 16 bits per weight quant.json reports: fp16 as IEEE float16, bf16 as
    # its bit pattern (the high half of the float32), both exact.
    model_dir, matrix, metrics = tiny
    for name, stored in (("fp16", np.dtype("<f2")), ("bf16", np.dtype("<u2"))):
        path = model_dir / "quant" / f"{name}.parquet"
        recipe = read_provenance(path)["dequantize"]
        assert pq.read_schema(path).field("codes").type == pa.binary(2 * matrix.shape[1]), name
        assert recipe["float_format"] == {"fp16": "float16", "bf16": "bfloat16"}[name] and np.dtype(recipe["codes_dtype"]) == stored
        assert metrics[name]["bits_per_weight"] == 16
        codes = layout.code_rows(pq.read_table(path), recipe["codes_dtype"])
        assert codes.shape == matrix.shape and codes.dtype == stored, name
        assert np.array_equal(layout.dequantize_file(path, recipe), SCHEMES[name]().round(matrix))
    bf16_bytes = pq.read_table(model_dir / "quant" / "bf16.parquet").column("codes")[0].as_py()
    bits = int.from_bytes(bf16_bytes[:2], "little")
    assert bits == int(round_to_bf16(matrix[0, :1]).view(np.uint32)[0]) >> 16
    fp16_bytes = pq.read_table(model_dir / "quant" / "fp16.parquet").column("codes")[0].as_py()
    assert fp16_bytes[:2] == np.float16(matrix[0, 0]).tobytes()


def test_a_file_in_the_older_list_layout_is_refused_with_the_fix(tiny, tmp_path):
    model_dir, _, _ = tiny
    path = model_dir / "quant" / "int8_row.parquet"
    recipe = read_provenance(path)["dequantize"]
    old = tmp_path / "int8_row.parquet"
    table = pq.read_table(path)
    codes = pa.FixedSizeListArray.from_arrays(pa.array(layout.code_rows(table, "int8").reshape(-1)), 128)
    pq.write_table(table.set_column(1, "codes", codes), old)
    with pytest.raises(DissectError, match="older layout; rebuild it with the quantize stage"):
        layout.dequantize_file(old, recipe)


def test_mistakes_are_one_line_errors_and_write_nothing(tmp_path):
    matrix = np.ones((40, 48), np.float32)
    model_dir = synthetic_model(tmp_path, matrix)
    cases = [
        (settings(["int8_row", "q4_0"]), "q4_0 quantizes blocks of 32.*dim is 48"),
        (settings(["int8_row", "q9"]), r'quantize.schemes\[1\] must be one of .*, got "q9"'),
        (settings([]), r"quantize.schemes must be a list of 1 or more items, got \[\]"),
        (settings(["int8_row"], recall_k=40), "recall_k is 40 but tiny has only 40 tokens"),
        (settings(["int8_row"], sample_tokens=-1), "quantize.sample_tokens must be a whole number from 0 to 1000000, got -1"),
    ]
    for bad, message in cases:
        with pytest.raises(DissectError, match=message):
            quantize_run(model_dir, bad)
    assert not (model_dir / "quant").exists() and not (model_dir / "quant.json").exists()


def test_main_reads_params_and_reports_errors_in_one_line(tmp_path, monkeypatch, capsys):
    synthetic_model(tmp_path, np.ones((40, 48), np.float32))
    params = {"quantize": settings(["q8_0"])}
    write_params(tmp_path, ["tiny"], **params)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_stage(quantize.main, ["tiny"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: q8_0 quantizes blocks of 32 values along each row, but the embedding dim is 48 (not a multiple of 32); "
        "remove q8_0 from quantize.schemes for this model"
    ]
    params["quantize"]["schemes"] = ["int8_row", "fp16"]
    write_params(tmp_path, ["tiny"], **params)
    run_stage(quantize.main, ["tiny"])
    assert sorted(json.loads((tmp_path / "artifacts/tiny/quant.json").read_text())) == ["fp16", "int8_row"]


# ---------------------------------------------------------------------------------------
# End to end on SmolLM2-135M (Q8_0 source).


@pytest.fixture(scope="module")
def smollm2_quant(smollm2_artifacts) -> dict:
    paths = ModelPaths.for_artifacts(smollm2_artifacts)
    words.run(paths, WordSettings(["Hello", "Hi", "Greetings", "Apple", "Banana", "Computer", "Science"], True, "mean", 10))
    return quantize_run(smollm2_artifacts, settings(sample_tokens=200, recall_k=10))


def test_smollm2_q8_0_requantization_is_lossless(smollm2_quant):
    # The matrix is Q8_0 dequantized: every block's absmax is 127 * its fp16 scale, so the
    # same scales and codes come back.
    q8 = smollm2_quant["q8_0"]
    assert q8["rmse"] == 0.0 and q8["max_abs_error"] == 0.0 and q8["snr_db"] is None
    assert q8["tokens_recall_at_k"] == 1.0 and q8["words_recall_at_k"] == 1.0 and q8["words_similarity_max_change"] == 0.0
    assert q8["compression_vs_source"] == 1.0 and q8["bits_per_weight"] == 8.5


def test_smollm2_q8_0_file_holds_the_gguf_tensor_bytes(smollm2_quant, smollm2_artifacts, smollm2_gguf):
    table = pq.read_table(smollm2_artifacts / "quant" / "q8_0.parquet")
    n = table.num_rows
    codes = layout.code_rows(table, "int8")
    scales = table.column("scales").combine_chunks().flatten().to_numpy().reshape(n, -1)
    blocks = ggml_blocks(Encoded(codes=codes, scales=scales, clipped=0), SCHEMES["q8_0"]())
    reader = gguf.GGUFReader(smollm2_gguf)
    (tensor,) = [t for t in reader.tensors if t.name == "token_embd.weight"]
    assert blocks.tobytes() == np.asarray(tensor.data).tobytes()


def test_smollm2_metrics(smollm2_quant, smollm2_artifacts):
    _, matrix = read_vectors(smollm2_artifacts / "embeddings.parquet")
    metrics = smollm2_quant
    assert sorted(metrics) == sorted(ALL_SCHEMES)
    beyond = np.count_nonzero((matrix.astype(np.float64) > 1.27) | (matrix.astype(np.float64) < -1.28))
    assert metrics["int8_tensor_fixed"]["clipped_values"] == beyond > 0  # SmolLM2's range exceeds 1.27
    assert metrics["fp16"]["tokens_recall_at_k"] > 0.98 and metrics["fp16"]["words_recall_at_k"] == 1.0
    assert metrics["int8_row"]["rmse"] < metrics["int8_tensor"]["rmse"] < metrics["q4_0"]["rmse"]
    assert 0.5 < metrics["q4_0"]["tokens_recall_at_k"] < 1.0
    assert metrics["nf4"]["row_cosine_min"] > 0.95
    rebuilt = run_snippet(smollm2_artifacts / "quant" / "nf4.parquet")
    scheme = SCHEMES["nf4"]()
    assert np.array_equal(rebuilt, scheme.decode(scheme.encode(matrix)))


# ---------------------------------------------------------------------------------------
# Writing in a second thread keeps writes atomic.


def int_batches(count: int, fail_after: int | None = None, schema: pa.Schema | None = None):
    schema = schema or pa.schema([pa.field("x", pa.int32())])
    for index in range(count):
        if index == fail_after:
            raise ValueError("producing failed")
        yield pa.record_batch([pa.array([index, index], pa.int32())], schema=schema)


def test_background_writer_writes_every_batch(tmp_path):
    path = tmp_path / "out.parquet"
    write_in_background(path, pa.schema([pa.field("x", pa.int32())]), int_batches(9))
    assert pq.read_table(path).column("x").to_pylist() == [i for i in range(9) for _ in range(2)]


def test_background_writer_abandons_the_file_when_producing_fails(tmp_path):
    path = tmp_path / "out.parquet"
    path.write_bytes(b"previous")
    with pytest.raises(ValueError, match="producing failed"):
        write_in_background(path, pa.schema([pa.field("x", pa.int32())]), int_batches(9, fail_after=5))
    assert path.read_bytes() == b"previous" and list(tmp_path.iterdir()) == [path]


def test_background_writer_raises_write_errors_without_hanging(tmp_path):
    path = tmp_path / "out.parquet"
    other = pa.schema([pa.field("y", pa.int32())])  # batches that do not fit the file's schema
    with pytest.raises(pa.ArrowInvalid):
        write_in_background(path, pa.schema([pa.field("x", pa.int64())]), int_batches(20, schema=other))
    assert list(tmp_path.iterdir()) == []


def test_start_writing_returns_with_the_writer_still_on_its_queue(tmp_path, monkeypatch):
    import threading

    from pipeline.core import parquet

    path, release = tmp_path / "out.parquet", threading.Event()
    write_batches = parquet.write_batches

    def held_writer(*args, **kwargs):  # a writer that starts only when released
        release.wait(timeout=30)
        write_batches(*args, **kwargs)

    monkeypatch.setattr(parquet, "write_batches", held_writer)
    # Three batches and the end mark wait in the queue for the held writer.
    finish = parquet.start_writing(path, pa.schema([pa.field("x", pa.int32())]), int_batches(3), queued=4)
    assert not release.is_set() and not path.exists()  # every batch produced, nothing written yet
    release.set()
    finish()
    assert pq.read_table(path).column("x").to_pylist() == [i for i in range(3) for _ in range(2)]


def test_a_scheme_that_fails_leaves_the_outputs_as_they_were_and_no_writer_running(tmp_path, monkeypatch):
    import threading

    rng = np.random.default_rng(2)
    model_dir = synthetic_model(tmp_path, rng.standard_normal((300, 64)).astype(np.float32))
    quantize_run(model_dir, settings(schemes=["fp16", "int8_row"]))
    before = {p.name: p.read_bytes() for p in (model_dir / "quant").iterdir()}

    def failing(self, rows):
        raise RuntimeError("encoding failed")

    monkeypatch.setattr(quantize.SCHEMES["int8_row"], "encode", failing)
    with pytest.raises(RuntimeError, match="encoding failed"):  # fp16's writer was still on its file
        quantize_run(model_dir, settings(schemes=["fp16", "int8_row"]))
    assert not [t for t in threading.enumerate() if t.name.startswith("write ")]
    assert {p.name: p.read_bytes() for p in (model_dir / "quant").iterdir()} == before


@pytest.mark.parametrize("pooling, expected", [("first", [1.0, 2.0]), ("last", [5.0, 6.0]), ("mean", [3.0, 4.0])])
def test_words_are_pooled_like_the_words_stage(pooling, expected):
    from pipeline.quant.recall import pool_rows

    rows = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=np.float32)  # a word split into three tokens
    assert pool_rows(rows, pooling).tolist() == expected


def test_words_come_from_words_parquet(tmp_path):
    matrix = np.arange(40 * 32, dtype=np.float32).reshape(40, 32)
    model_dir = synthetic_model(tmp_path, matrix)
    write_words(model_dir, matrix, [("a", "a", [3, 5]), ("b", "b", [7])], pooling="last")
    queries, pooling = quantize.word_queries(ModelPaths.for_artifacts(model_dir), 40)
    assert [(q.text, q.token_ids) for q in queries] == [("a", (3, 5)), ("b", (7,))] and pooling == "last"
    write_words(model_dir, np.zeros((50, 32), np.float32), [("a", "a", [39, 45])])  # another model's words
    with pytest.raises(DissectError, match="outside the 40 rows of the matrix"):
        quantize.word_queries(ModelPaths.for_artifacts(model_dir), 40)
    (model_dir / "words.parquet").unlink()
    with pytest.raises(DissectError, match="dvc repro words@tiny"):
        quantize.word_queries(ModelPaths.for_artifacts(model_dir), 40)


def _sequential_lane_sums(original: np.ndarray, restored: np.ndarray) -> tuple[list, list, list, list]:
    """The kernel's sums written out in Python: element j of a row into lane j % 4, in order."""
    from pipeline.quant.kernels import LANES

    dots, squares, errors, largest = [], [], [], []
    for o_row, r_row in zip(original, restored):
        lanes = np.zeros((3, LANES))
        for j, (o, r) in enumerate(zip(o_row, r_row)):
            x = np.float32(r - o)
            lanes[:, j % LANES] += [float(o) * float(r), float(r) * float(r), float(x) * float(x)]
        dot, square, error = (((lane[0] + lane[1]) + lane[2]) + lane[3] for lane in lanes)
        dots.append(dot), squares.append(square), errors.append(error)
        largest.append(np.float32(np.abs(r_row - o_row).max()))
    return dots, squares, errors, largest


def test_row_errors_by_hand():
    # Row (3, 4) against (3, 3): dot 21, |restored| sqrt(18), squared error 1, largest 1.
    errors = row_errors(np.array([[3.0, 4.0]], np.float32), np.array([[3.0, 3.0]], np.float32))
    assert errors.dots.tolist() == [21.0] and errors.norms.tolist() == [math.sqrt(18)]
    assert errors.squared_error.tolist() == [1.0] and errors.largest_error.tolist() == [1.0] and errors.values == 2


@hypothesis_settings(max_examples=40, deadline=None)
@given(st.integers(1, 70), st.integers(1, 11), st.integers(0, 2**32 - 1))
def test_row_errors_sum_in_the_documented_order(rows, dim, seed):
    # dims that are and are not multiples of the lanes (measured many rows together, or one
    # row at a time), rows that fill ROWS_TOGETHER more than once and less; magnitudes far
    # apart, so another order of the float64 additions would show in the last bits.
    rng = np.random.default_rng(seed)
    original = (rng.standard_normal((rows, dim)) * 10.0 ** rng.integers(-8, 8, (rows, dim))).astype(np.float32)
    restored = (original + rng.standard_normal((rows, dim)).astype(np.float32)).astype(np.float32)
    errors = row_errors(original, restored)
    dots, squares, squared_errors, largest = _sequential_lane_sums(original, restored)
    assert errors.dots.tolist() == dots and errors.squared_error.tolist() == squared_errors
    assert errors.norms.tolist() == np.sqrt(squares).tolist() and errors.largest_error.tolist() == largest


def test_rows_measured_together_equal_one_row_at_a_time_bit_for_bit():
    from pipeline.quant.kernels import _row_error_sums_by_row, row_error_sums

    rng = np.random.default_rng(3)
    original = rng.standard_normal((70, 64)).astype(np.float32)
    restored = (original + rng.standard_normal(original.shape).astype(np.float32) / 100).astype(np.float32)
    restored[5, 1], original[7, 2], restored[40, 0] = np.nan, np.inf, -np.nan
    together, alone = ([np.empty(70) for _ in range(3)] + [np.empty(70, np.float32)] for _ in range(2))
    row_error_sums(original, restored, *together)
    _row_error_sums_by_row(original, restored, *alone)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(together, alone))
    assert np.isnan(together[3][[5, 40]]).all() and together[3][7] == np.inf and np.isfinite(together[3][8])


def test_row_errors_keep_a_nan_as_largest():
    original = np.zeros((1, 9), np.float32)
    restored = np.ones((1, 9), np.float32)
    restored[0, 2] = np.nan
    assert np.isnan(row_errors(original, restored).largest_error[0])


def test_compiled_bfloat16_directions_round_as_torch_and_measure_the_residual():
    from pipeline.core.bfloat16 import bfloat16_directions

    rng = np.random.default_rng(12)
    rows = (rng.standard_normal((6, 40)) * 10.0 ** rng.integers(-3, 3, (6, 1))).astype(np.float32)
    rows[2] = 0.0
    rows[4, 7] = np.inf  # a broken row: its inverse is 0 and inf * 0 is NaN
    norms = np.sqrt((rows.astype(np.float64) ** 2).sum(axis=1))
    with np.errstate(divide="ignore"):
        inverse = np.where(np.isfinite(norms) & (norms > 0), 1 / norms, 0).astype(np.float32)
    bits = np.empty(rows.shape, np.uint16)
    largest = bfloat16_directions(rows, inverse, bits)
    with np.errstate(invalid="ignore"):
        scaled = rows * inverse[:, None]  # [6, 40] float32, as the kernel computes it
    expected = torch.from_numpy(scaled).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    rounded = (bits.astype(np.uint32) << 16).view(np.float32)
    nan = np.isnan(scaled)  # x86 makes inf * 0 the negative NaN, which torch keeps; 0x7FC0 here
    assert np.array_equal(bits[~nan], expected[~nan]) and np.isnan(rounded[nan]).all() and nan[4, 7]
    residuals = np.sqrt(((rounded.astype(np.float64) - scaled) ** 2).sum(axis=1))
    true_largest = np.nanmax(residuals)
    # The float32 sum in any order is within a factor (1 - 40 * 2**-24) of the true one.
    assert true_largest <= largest <= true_largest * (1 + 40 * 2.0**-24) and largest > 0


@given(seed=st.integers(0, 2**32 - 1), dim=st.integers(1, 3000), scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e4]))
def test_the_compiled_residual_bounds_every_row(seed, dim, scale):
    from pipeline.core.bfloat16 import bfloat16_directions

    rows = (np.random.default_rng(seed).standard_normal((3, dim)) * scale).astype(np.float32)
    inverse = np.ones(3, np.float32)  # unscaled rows: tiny ones make squares that underflow float32
    bits = np.empty(rows.shape, np.uint16)
    largest = bfloat16_directions(rows, inverse, bits)
    rounded = (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    true_largest = np.sqrt(((rounded - rows) ** 2).sum(axis=1)).max()
    assert true_largest <= largest <= true_largest * (1 + dim * 2.0**-24) + np.sqrt(dim) * 2.0**-74
