"""report and compare: markdown helpers by hand, the trade-off rule, and comparison text for
one and several models."""

from __future__ import annotations

import pytest

from pipeline.report import markdown as md
from pipeline.stages.compare import ModelSummary, differences, quant_table, render
from pipeline.stages.report import best_trade_off


def test_tokens_are_quoted_and_escaped():
    assert md.token(" Hello") == '`" Hello"`'
    assert md.token("a|b") == '`"a\\|b"`'  # a pipe would end the table cell
    assert md.token("line\nbreak") == '`"line\\nbreak"`'
    assert md.token("back`tick") == '`` "back`tick" ``'
    assert md.token("日本") == '`"日本"`'
    assert md.token(None) == "*(padding)*"


def test_numbers_are_rounded_for_reading():
    assert md.number(49152) == "49,152"
    assert md.number(0.135581) == "0.1356"
    assert md.number(-0.000542) == "-5.420e-04"
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
    table = quant_table(models)
    assert table.splitlines()[0] == "| scheme | small | big |"


@pytest.mark.parametrize("count", [1, 2, 3])
def test_compare_table_has_a_row_per_model(count):
    text = render([summary(f"m{i}", 100 + i, 8, 0.1 * i, 1.0 + i) for i in range(count)])
    assert sum(1 for line in text.splitlines() if line.startswith("| [m")) == count
