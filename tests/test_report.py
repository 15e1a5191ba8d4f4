"""report and compare: markdown helpers by hand, the trade-off rule, pure sections numbered
from their list, the report stage on a toy model, and comparison text for one and several
models."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.core.errors import DissectError
from pipeline.core.io import write_bytes_atomic, write_json_atomic
from pipeline.core.parquet import vector_array, write_table
from pipeline.report import markdown as md
from pipeline.report.render import SECTIONS
from pipeline.report.render import render as render_report
from pipeline.report.sections import Exports, best_trade_off, drift_section, export_section
from pipeline.stages.compare import ModelSummary, differences, quant_table, quant_tables, render
from pipeline.core.paths import ModelPaths
from pipeline.core.settings import NoSettings
from pipeline.stages.report import load_artifacts
from pipeline.stages.report import run as run_report


def test_tokens_are_quoted_and_escaped():
    assert md.token(" Hello") == '`"\u00a0Hello"`'  # a no-break space: the code span cannot wrap there
    assert md.token("a|b") == '`"a\\|b"`'  # a pipe would end the table cell
    assert md.token("line\nbreak") == '`"line\\nbreak"`'
    assert md.token("back`tick") == '`` "back`tick" ``'
    assert md.token("日本") == '`"日本"`'
    assert md.token(None) == "*(padding)*"


def test_rounding_never_collapses_a_range():
    # The report once said "range from 1.03 to 1.04; the middle 98% lie between 1.03 and 1.03".
    values = [1.0291, 1.0412, 1.0307, 1.0339]
    assert md.distinct_numbers(values, 3) == ["1.029", "1.041", "1.031", "1.034"]
    assert md.distinct_numbers([1.79, 7.49, 2.18, 4.93], 3) == ["1.79", "7.49", "2.18", "4.93"]  # enough as it is
    assert md.distinct_numbers([2.0, 2.0, 3.0], 3) == ["2", "2", "3"]  # equal values may read the same
    close = md.distinct_numbers([1.0000001, 1.0000002], 3)
    assert close[0] != close[1]


def test_numbers_are_rounded_for_reading():
    assert md.number(49152) == "49,152"
    assert md.number(0.135581) == "0.1356"
    assert md.number(-0.000542) == "-5.420×10⁻⁴"  # no hyphen for a browser to break the line at
    assert md.number(123456.0) == "1.235×10⁵"
    assert md.number(0.0) == "0"
    assert md.number(None) == "–"
    assert md.percent(0.00714, 3) == "0.714%"


def test_table_layout():
    assert md.table(["a", "b"], [["1", "2"]], "lr") == "| a | b |\n| :--- | ---: |\n| 1 | 2 |"


def metrics(bits: float, row_cos_min: float, recall: float, rmse: float) -> dict:
    return {"bits_per_weight": bits, "row_cosine_min": row_cos_min, "tokens_recall_at_k": recall, "rmse": rmse, "snr_db": 30.0}


def test_best_trade_off_is_the_smallest_scheme_that_keeps_rows_and_neighbours():
    quant = {
        "fp16": metrics(16, 1.0, 1.0, 0.0),
        "int8": metrics(8, 0.999, 0.95, 0.004),
        "int8_clipping": metrics(8, 0.995, 0.93, 0.003),  # same size, fewer neighbours kept
        "q4": metrics(4.5, 0.98, 0.85, 0.015),  # smaller, but a row's direction moves too much
    }
    assert best_trade_off(quant) == "int8"
    assert best_trade_off({"q4": quant["q4"]}) is None


def summary(name: str, vocab: int, dim: int, cos: float, median_norm: float) -> ModelSummary:
    stats = {"values": {"mean": 0.0, "std": 0.1, "max_abs": 1.0}, "row_norm": {"p50": median_norm},
             "anisotropy": {"mean_cos_to_mean": cos}, "rows": {"duplicate": 0}}
    return ModelSummary(name=name, source_dtype="float32", vocab=vocab, dim=dim, stats=stats, first_word="Hello",
                        first_word_neighbours=[(" Hello", 0.8)], quant={"q8_0": {"rmse": 0.001, "tokens_recall_at_k": 0.99}})


def test_compare_with_one_model_says_how_to_add_another():
    text = render([summary("a", 100, 8, 0.5, 3.0)])
    assert "1 model from params.yaml" in text
    assert "[a](a/report.md)" in text
    assert "+model@models.NAME=NAME" in text


def test_compare_names_the_extremes():
    models = [summary("small", 100, 8, 0.6, 3.0), summary("big", 5000, 64, 0.1, 1.0)]
    text = differences(models)
    assert "from 100 tokens (small) to 5,000 (big)" in text
    assert "small is the most anisotropic" in text and "big the least" in text
    table = quant_table(models, "rmse")
    assert table.splitlines()[0] == "| model | `q8_0` |"
    assert table.splitlines()[2:] == ["| small | 1.00×10⁻³ |", "| big | 1.00×10⁻³ |"]
    assert quant_table(models, "tokens_recall_at_k").splitlines()[2] == "| small | 0.990 |"


def test_index_columns_use_one_number_format_and_state_k():
    assert md.column([0.0145, 1.91e-4, 0.0], 3) == ["1.45×10⁻²", "1.91×10⁻⁴", "0"]  # one needs an exponent: all get one
    assert md.column([0.997, 1.0, None], 3) == ["0.997", "1.000", "–"]  # the same decimals down the column
    assert md.column([49152, 30522]) == ["49,152", "30,522"]
    models = [summary("small", 100, 8, 0.6, 3.0)]
    models[0].quant["q8_0"]["recall_k"] = 10
    assert "Recall@10 (k = quantize.recall_k):" in quant_tables(models)


def test_best_trade_off_names_the_other_schemes_that_qualified():
    from pipeline.report.sections import qualified

    quant = {"q4_0": {"bits_per_weight": 4.5, "row_cosine_min": 0.98, "tokens_recall_at_k": 0.84, "rmse": 0.01},
             "q8_0": {"bits_per_weight": 8.5, "row_cosine_min": 0.999, "tokens_recall_at_k": 0.97, "rmse": 0.001},
             "fp16": {"bits_per_weight": 16, "row_cosine_min": 1.0, "tokens_recall_at_k": 1.0, "rmse": 0.0},
             "int8_row": {"bits_per_weight": 8.5, "row_cosine_min": 0.999, "tokens_recall_at_k": 0.99, "rmse": 0.002}}
    assert qualified(quant) == ["int8_row", "q8_0", "fp16"]


@pytest.mark.parametrize("count", [1, 2, 3])
def test_compare_table_has_a_row_per_model(count):
    text = render([summary(f"m{i}", 100 + i, 8, 0.1 * i, 1.0 + i) for i in range(count)])
    assert sum(1 for line in text.splitlines() if line.startswith("| [m")) == count


# --------------------------------------------------------------------------------------
# The per-model report on a toy model


DIM = 4
WORDS = [("Hello", "Hello", [1]), ("Hello", " Hello", [2]), ("Hi", "Hi", [3, 4])]
PNG = b"\x89PNG\r\n\x1a\n"


def toy_artifacts(root: Path, name: str = "toy") -> Path:
    """artifacts/<name>/ with every file the report stage reads, small and made up."""
    model_dir = root / "artifacts" / name
    rng = np.random.default_rng(0)
    matrix = rng.normal(size=(6, DIM)).astype(np.float32)
    provenance = {
        "format": "safetensors", "matrix_sha256": "0" * 64, "shape": list(matrix.shape), "source_dtype": "F32",
        "source_files": [{"path": f"models/{name}/model.safetensors", "bytes": 96, "sha256": "1" * 64}],
        "tensor_key": "embed.weight", "params": {"model": {"source": {"path": "x"}}},
        "tokenizer": {"kind": "tokenizer.json", "path": f"models/{name}/tokenizer.json", "vocab_size": 6},
    }
    tokens = pa.array([f"t{i}" for i in range(len(matrix))])
    write_table(model_dir / "embeddings.parquet", pa.table({"token_id": pa.array(range(6), pa.int32()), "token": tokens,
                                                          "vector": vector_array(matrix)}), provenance)
    write_json_atomic(model_dir / "stats.json", {
        "vocab_size": 6, "dim": matrix.shape[1],
        "values": {"count": matrix.size, "mean": 0.01, "std": 0.9, "min": -2.0, "max": 2.0, "max_abs": 2.0, "nan_count": 0, "inf_count": 0},
        "row_norm": {"mean": 1.5, "std": 0.3, "min": 1.0, "max": 2.0, "p01": 1.01, "p50": 1.5, "p99": 1.99},
        "rows": {"total": 6, "duplicate": 0, "zero": 0, "nonfinite": 0},
        "anisotropy": {"mean_vector_norm": 0.2, "mean_cos_to_mean": 0.05},
    })
    write_json_atomic(model_dir / "norm_hist.json", [{"bin_start": 1.0 + i / 4, "bin_end": 1.25 + i / 4, "count": c}
                                                    for i, c in enumerate([1, 2, 2, 1])])
    write_table(model_dir / "dims.parquet", pa.table({"dim": pa.array(range(DIM), pa.int32()), "std": matrix.std(axis=0).astype(float)}), {})
    vectors = np.stack([matrix[ids].mean(axis=0) for _, _, ids in WORDS])
    write_table(model_dir / "words.parquet", pa.table({
        "word": [w for w, _, _ in WORDS], "variant": [v for _, v, _ in WORDS],
        "token_ids": pa.array([ids for _, _, ids in WORDS], pa.list_(pa.int32())),
        "tokens": [[f"t{i}" for i in ids] for _, _, ids in WORDS], "n_tokens": pa.array([len(ids) for _, _, ids in WORDS], pa.int32()),
        "split": [len(ids) > 1 for _, _, ids in WORDS], "pooling": ["mean"] * len(WORDS), "vector": vector_array(vectors),
        "l2_norm": [float(n) for n in np.linalg.norm(vectors, axis=1)], "first_10": [v.tolist() for v in vectors],
        "top_dims": [[0, 1] for _ in WORDS], "top_values": [v[:2].tolist() for v in vectors],
    }), {})
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cosines = unit @ unit.T
    pairs = [(a, b) for a in range(len(WORDS)) for b in range(len(WORDS))]
    write_table(model_dir / "similarity.parquet", pa.table({
        "variant_a": [WORDS[a][1] for a, _ in pairs], "variant_b": [WORDS[b][1] for _, b in pairs],
        "cosine": pa.array([float(cosines[a, b]) for a, b in pairs], pa.float32()),
    }), {})
    write_table(model_dir / "neighbors.parquet", pa.table({
        "variant": [v for _, v, _ in WORDS for _ in range(2)], "rank": pa.array([1, 2] * len(WORDS), pa.int32()),
        "token": ["t0", "t5"] * len(WORDS), "cosine": pa.array([0.5, 0.25] * len(WORDS), pa.float32()),
    }), {})
    write_json_atomic(model_dir / "pca_variance.json", [{"component": 1, "explained_variance_ratio": 0.5, "cumulative": 0.5},
                                                       {"component": 2, "explained_variance_ratio": 0.25, "cumulative": 0.75}])
    for figure in ("pca_words.png", "pca_vocab.png"):
        write_bytes_atomic(model_dir / "figures" / figure, PNG + figure.encode())
    write_json_atomic(model_dir / "quant.json", {"int8_row": {
        "bits_per_weight": 8.25, "bytes_on_disk": 60, "compression_vs_float32": 3.9, "rmse": 0.01, "max_abs_error": 0.02,
        "snr_db": 40.0, "row_cosine_mean": 0.9999, "row_cosine_min": 0.999, "clipped_fraction": 0.0, "clipped_values": 0,
        "words_recall_at_k": 1.0, "tokens_recall_at_k": 1.0, "words_similarity_max_change": 0.001}})
    write_json_atomic(model_dir / "undertrained.json", {
        "reference": {"method": "reference_tokens", "count": 1}, "percentile": 2.0, "threshold_cos_dist_ref_centered": 0.1,
        "flagged": 1, "vocab_size": 6, "flagged_outside_reference": 0, "flagged_not_encodable_to_self": 0,
        "strongest": [{"rank": 1, "token_id": 5, "token": "t5", "cos_dist_ref_centered": 0.0, "l2_norm": 1.2,
                       "is_reference": True, "encodes_to_self": None}]})
    return model_dir


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


HEADING = re.compile(r"^## (\d+)\. (.*)$", re.MULTILINE)


def test_sections_write_nothing_and_draw_nothing(tmp_path, monkeypatch):
    artifacts = load_artifacts(toy_artifacts(tmp_path))
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)  # a relative write would land here
    for section in SECTIONS:
        section.heading(artifacts), section.body(artifacts), section.figures(artifacts)
    report = render_report(artifacts)
    assert snapshot(tmp_path) == before
    assert report.markdown == render_report(artifacts).markdown  # and the same text every time


def test_headings_are_numbered_from_the_section_list(tmp_path):
    artifacts = load_artifacts(toy_artifacts(tmp_path))
    titles = ["The model", "The matrix", '`"Hello"` from text to vector', "Similarity", "PCA", "Quantization",
              "Under-trained tokens", "Using the artifacts"]
    assert HEADING.findall(render_report(artifacts).markdown) == [(str(i), t) for i, t in enumerate(titles, 1)]

    without_quant = [section for section in SECTIONS if section.title != "Quantization"]
    headings = HEADING.findall(render_report(artifacts, without_quant).markdown)
    assert headings == [(str(i), t) for i, t in enumerate([t for t in titles if t != "Quantization"], 1)]
    assert ("6", "Under-trained tokens") in headings

    reordered = render_report(artifacts, [SECTIONS[-1], SECTIONS[0]]).markdown
    assert HEADING.findall(reordered) == [("1", "Using the artifacts"), ("2", "The model")]


def test_figures_follow_the_sections_that_show_them(tmp_path):
    artifacts = load_artifacts(toy_artifacts(tmp_path))
    report = render_report(artifacts)
    shown = re.findall(r"!\[[^]]*\]\(figures/([^)]+)\)", report.markdown)
    assert [job.name for job in report.figures] == shown
    without_pca = render_report(artifacts, [s for s in SECTIONS if s.title != "PCA"])
    assert [job.name for job in without_pca.figures] == ["norm_histogram.png", "first_dims.png", "similarity.png"]


def test_missing_results_give_a_note(tmp_path):
    artifacts = replace(load_artifacts(toy_artifacts(tmp_path)), quant=None, undertrained=None)
    text = render_report(artifacts).markdown
    assert "## 6. Quantization\n\nNo quantization was run for this model (`quantize` stage)." in text
    assert "## 7. Under-trained tokens\n\nNot computed for this model (`undertrained` stage)." in text


def test_report_stage_draws_every_figure_it_shows(tmp_path):
    model_dir = toy_artifacts(tmp_path)
    path = run_report(ModelPaths.in_project("toy", tmp_path), NoSettings())
    text = path.read_text(encoding="utf-8")
    figures = path.parent / "figures"
    shown = re.findall(r"!\[[^]]*\]\(figures/([^)]+)\)", text)
    assert sorted(shown) == sorted(p.name for p in figures.iterdir())
    assert all(p.read_bytes().startswith(PNG) for p in figures.iterdir())
    for name in ("pca_words.png", "pca_vocab.png"):  # the pca stage's, copied as they are
        assert (figures / name).read_bytes() == (model_dir / "figures" / name).read_bytes()
    first = snapshot(path.parent)
    run_report(ModelPaths.in_project("toy", tmp_path), NoSettings())
    assert snapshot(path.parent) == first


def test_report_stage_names_the_missing_pca_figure_before_writing(tmp_path):
    model_dir = toy_artifacts(tmp_path)
    (model_dir / "figures" / "pca_vocab.png").unlink()
    with pytest.raises(DissectError, match="pca@toy"):
        run_report(ModelPaths.in_project("toy", tmp_path), NoSettings())
    assert not (tmp_path / "reports").exists()


# --------------------------------------------------------------------------------------
# The index's sections


def test_export_section_names_the_model_in_its_heading():
    assert export_section("m", None) == "## Exports: m\n\nNot exported for this model (`export` stage)."
    text = export_section("m", Exports(rows=150_000, projector_tensors=2))
    assert text.startswith("## Exports: m\n") and "150,000 tokens" in text and "into 2 tensors" in text


def test_drift_section_without_results():
    assert drift_section("a-b", None) == "## Drift: `a-b`\n\nNot computed (`drift` stage)."
