"""words: variants, splits and pooling on a hand-built tokenizer; the real Llama 3.2 tokenizer end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.errors import DissectError
from pipeline.core.parquet import read_provenance, read_vectors
from pipeline.tokenizers.load import tokenizer_from_json
from pipeline.core.paths import ModelPaths
from pipeline.core.settings import read_section
from pipeline.stages.words import WordSettings, top_dims, words_table, run

from builders import write_params
from tests.test_lookup import ANA, BAN, HELLO, PIECES, SPACE, SPACE_HELLO, hand_matrix, hand_tokenizer

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ["word", "variant", "token_ids", "tokens", "n_tokens", "split", "pooling", "vector", "l2_norm",
           "first_10", "top_dims", "top_values"]  # fmt: skip
TUTORIAL = {"list": ["Hello", "Hi", "Greetings", "Apple", "Banana", "Computer", "Science"], "leading_space": True,
            "pooling": "mean", "top_k": 10}  # fmt: skip


def hand_table(pooling: str = "mean", top_k: int = 2, leading_space: bool = True) -> pa.Table:
    settings = WordSettings(["Hello", "Banana"], leading_space, pooling, top_k)
    return words_table(hand_matrix(), hand_tokenizer(), pa.array(PIECES), settings)


def test_variants_and_splits_on_the_hand_tokenizer():
    table = hand_table()
    assert table.column_names == COLUMNS
    rows = table.to_pylist()
    assert [(r["word"], r["variant"]) for r in rows] == [("Hello", "Hello"), ("Hello", " Hello"), ("Banana", "Banana"), ("Banana", " Banana")]
    assert [r["token_ids"] for r in rows] == [[HELLO], [SPACE_HELLO], [BAN, ANA], [SPACE, BAN, ANA]]  # no [BOS]
    assert [r["tokens"] for r in rows] == [["Hello"], [" Hello"], ["Ban", "ana"], [" ", "Ban", "ana"]]
    assert [r["n_tokens"] for r in rows] == [1, 1, 2, 3]
    assert [r["split"] for r in rows] == [False, False, True, True]
    assert table.schema.field("vector").type == pa.list_(pa.float32(), 4)
    matrix = hand_matrix()
    assert rows[0]["vector"] == matrix[HELLO].tolist()
    assert rows[0]["l2_norm"] == pytest.approx(np.sqrt(0.25 + 4 + 4 + 1))
    assert rows[0]["first_10"] == matrix[HELLO].tolist()  # a 4-dim model has only 4 to show
    # |-2.0| and |2.0| tie: the lower dimension comes first.
    assert (rows[0]["top_dims"], rows[0]["top_values"]) == ([1, 2], [-2.0, 2.0])
    assert table.column("pooling").to_pylist() == ["mean"] * 4


@pytest.mark.parametrize(
    ("pooling", "expected"),
    [("mean", lambda m: (m[SPACE] + m[BAN] + m[ANA]) / 3), ("first", lambda m: m[SPACE]), ("last", lambda m: m[ANA])],
)
def test_pooling_of_a_split_word(pooling, expected):
    matrix = hand_matrix().astype(np.float64)
    row = hand_table(pooling).to_pylist()[3]  # " Banana": three tokens
    assert row["pooling"] == pooling and row["split"]
    assert row["vector"] == pytest.approx(expected(matrix).tolist(), rel=1e-7)


def test_without_leading_space_each_word_once():
    assert hand_table(leading_space=False).column("variant").to_pylist() == ["Hello", "Banana"]


def test_top_dims_ties_go_to_the_lower_dimension():
    dims, values = top_dims(np.array([1.0, -3.0, 3.0, 0.5, -3.0], np.float32), 3)
    assert dims.tolist() == [1, 2, 4] and values.tolist() == [-3.0, 3.0, -3.0]
    assert dims.dtype == np.int32 and values.dtype == np.float32
    assert top_dims(np.zeros(3, np.float32), 10)[0].tolist() == [0, 1, 2]  # k beyond dim: every dim


@pytest.mark.parametrize(
    ("words", "message"),
    [
        ([], r"words.list must be a list of 1 to 1000 items, got \[\]"),
        (["Hello", ""], r'words.list\[1\] must be a word, got ""'),
        (["Hello", " \t "], r'words.list\[1\] must be a word, got " \\t "'),
        (["Hello", True], r"words.list\[1\] must be text, got true; quote it"),
        (["Hello", "Hello"], r'words.list\[1\] repeats "Hello"; list each entry once'),
    ],
)
def test_bad_word_lists_are_clear_errors(words, message):
    with pytest.raises(DissectError, match=message):
        read_section(WordSettings, {**TUTORIAL, "list": words}, "words")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pooling": "max"}, 'words.pooling must be one of mean, first, last, got "max"'),
        ({"top_k": 0}, "words.top_k must be a whole number from 1 to 100000, got 0"),
        ({"leading_space": "yes"}, 'words.leading_space must be true or false, got "yes"'),
        ({"list": None}, "words.list must be a list of 1 to 1000 items, got null"),
        ({"lsit": ["Hello"]}, "words.lsit is not a setting of words"),
    ],
)
def test_bad_settings_are_clear_errors(change, message):
    with pytest.raises(DissectError, match=message):
        read_section(WordSettings, {**TUTORIAL, **change}, "words")


def test_word_beyond_the_matrix_is_named():
    settings = WordSettings(["Hello", "Banana"], True, "mean", 2)
    with pytest.raises(DissectError, match="'Banana' encodes to token id 16, outside the embedding's 16 rows"):
        words_table(hand_matrix()[:16], hand_tokenizer(), pa.array(PIECES), settings)


def test_non_ascii_and_very_long_words_on_the_llama_tokenizer(llama_small_artifacts):
    _, matrix = read_vectors(llama_small_artifacts / "embeddings.parquet")
    tokens = pq.read_table(llama_small_artifacts / "embeddings.parquet", columns=["token"]).column("token")
    tok = tokenizer_from_json(llama_small_artifacts / "tokenizer.json")
    long_word = "Supercalifragilistic" * 50  # 1000 characters
    table = words_table(matrix, tok, tokens, WordSettings(["你好", "🙂", long_word], True, "mean", 10))
    rows = {row["variant"]: row for row in table.to_pylist()}
    assert rows["你好"]["tokens"] == ["你", "好"] and rows["你好"]["split"]
    assert rows[" 🙂"]["n_tokens"] == 1 and rows[" 🙂"]["tokens"] == [" 🙂"]
    # The emoji alone splits inside its UTF-8 bytes; the pieces say so rather than inventing text.
    assert rows["🙂"]["tokens"] == ["<0xF0><0x9F>", "<0x99><0x82>"]
    long_row = rows[long_word]
    assert long_row["n_tokens"] > 100 and "".join(long_row["tokens"]) == long_word
    mean = matrix[long_row["token_ids"]].astype(np.float64).mean(axis=0)
    assert long_row["vector"] == pytest.approx(mean.tolist(), rel=1e-6, abs=1e-7)


def project_with(artifacts: Path, root: Path) -> Path:
    model_dir = root / "artifacts" / artifacts.name
    model_dir.mkdir(parents=True)
    for name in ("embeddings.parquet", "tokenizer.json"):
        (model_dir / name).symlink_to(artifacts / name)
    return model_dir


def test_stage_on_llama_small_hello_is_one_token_and_banana_splits(llama_small_artifacts, tmp_path):
    model_dir = project_with(llama_small_artifacts, tmp_path)
    run(ModelPaths.for_artifacts(model_dir), read_section(WordSettings, TUTORIAL, "words"))
    table = pq.read_table(model_dir / "words.parquet")
    assert table.column_names == COLUMNS and table.num_rows == 14
    rows = {row["variant"]: row for row in table.to_pylist()}
    _, matrix = read_vectors(model_dir / "embeddings.parquet")

    hello = rows["Hello"]
    assert (hello["token_ids"], hello["tokens"], hello["split"]) == ([9906], ["Hello"], False)
    assert hello["vector"] == matrix[9906].tolist()  # exactly the row
    assert hello["first_10"] == matrix[9906, :10].tolist()
    assert hello["l2_norm"] == pytest.approx(np.linalg.norm(matrix[9906].astype(np.float64)), rel=1e-12)
    order = np.argsort(-np.abs(matrix[9906]), kind="stable")[:10]
    assert hello["top_dims"] == order.tolist() and hello["top_values"] == matrix[9906, order].tolist()
    assert rows[" Hello"]["token_ids"] == [22691] and rows[" Hello"]["tokens"] == [" Hello"]

    banana = rows["Banana"]
    assert banana["split"] and banana["n_tokens"] == 2 and "".join(banana["tokens"]) == "Banana"
    mean = matrix[banana["token_ids"]].astype(np.float64).mean(axis=0).astype(np.float32)
    assert banana["vector"] == mean.tolist()

    provenance = read_provenance(model_dir / "words.parquet")
    assert provenance["stage"] == "words" and provenance["params"] == {"words": TUTORIAL}
    assert provenance["input"]["matrix_sha256"] == read_provenance(model_dir / "embeddings.parquet")["matrix_sha256"]
    # Readable by the tools the README names.
    path = str(model_dir / "words.parquet")
    first = duckdb.sql(f"SELECT token_ids, vector[1:3] FROM '{path}' WHERE variant = 'Hello'").fetchall()
    assert first == [([9906], matrix[9906, :3].tolist())]
    assert pl.read_parquet(path).filter(pl.col("split"))["variant"].to_list() == [
        row["variant"] for row in table.to_pylist() if row["split"]
    ]


def test_command_line_writes_words_or_fails_with_one_line(llama_small_artifacts, tmp_path):
    project_with(llama_small_artifacts, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "pipeline.stages.words", "llama-small"]
    out = tmp_path / "artifacts" / "llama-small" / "words.parquet"

    write_params(tmp_path, ["llama-small"], words={"list": [], "leading_space": True, "pooling": "mean", "top_k": 10})
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 2 and not out.exists()
    assert done.stderr.strip().splitlines() == ["error: words.list must be a list of 1 to 1000 items, got []"]

    write_params(tmp_path, ["llama-small"], words={"list": ["Hello", "Banana"], "leading_space": False, "pooling": "first", "top_k": 3})
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    table = pq.read_table(out)
    assert table.column("variant").to_pylist() == ["Hello", "Banana"]
    assert table.column("pooling").to_pylist() == ["first", "first"]
    assert [len(dims) for dims in table.column("top_dims").to_pylist()] == [3, 3]
