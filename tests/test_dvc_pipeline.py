"""`dvc repro` end to end in a fresh git repository on the real models of the default
pipeline (the generated series is test_cluster's), then an experiment that adds a model,
compared with DVC's own tools."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.core.parquet import read_provenance, read_vectors
from project_repo import assert_built_as_committed, copy_project, run, without_the_series

pytestmark = pytest.mark.slow  # `dvc repro` end to end in a fresh repository: minutes


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the project in a new git repo, with `dvc repro` run once."""
    repo = copy_project(tmp_path_factory.mktemp("repo"))
    without_the_series(repo)
    run(["dvc", "repro"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "repro"], repo)
    return repo


def test_repro_builds_the_default_model(project):
    parquet = project / "artifacts" / "smollm2-135m" / "embeddings.parquet"
    token_ids, matrix = read_vectors(parquet)
    assert matrix.shape == (49152, 576)
    assert np.array_equal(token_ids, np.arange(49152))
    provenance = read_provenance(parquet)
    assert provenance["source_dtype"] == "Q8_0"
    assert provenance["tensor_key"] == "token_embd.weight"
    assert (project / "artifacts" / "smollm2-135m" / "tokenizer.json").is_file()
    assert (project / "dvc.lock").is_file()


def test_the_build_is_the_committed_dvc_lock_and_reports(project):
    # The promise of a clean clone: what this machine computes, whatever its BLAS kernel, is
    # what dvc.lock and reports/ hold; this project leaves the series to test_cluster.
    pages = assert_built_as_committed(project)
    assert len(pages) >= 4 * 8  # each model's report, headline and figures


def test_repro_compares_real_versions_of_minilm(project):
    import json

    drift = project / "artifacts" / "drift"
    published = json.loads((drift / "minilm-l6-published-int8" / "drift.json").read_text())
    assert 0.006 < published["relative_frobenius"] < 0.008 and published["cosine"]["min"] > 0.999
    ours = json.loads((drift / "minilm-l6-int8_row-published-int8" / "drift.json").read_text())
    assert ours["relative_frobenius"] < 1e-3 and ours["identical_rows"] > 0.99 * ours["aligned"]
    paraphrase = json.loads((drift / "minilm-l6-paraphrase-l3" / "drift.json").read_text())
    assert 0.45 < paraphrase["relative_frobenius"] < 0.53 and 0.85 < paraphrase["cosine"]["mean"] < 0.91
    index = (project / "reports" / "index.md").read_text(encoding="utf-8")
    assert "## Drift: `minilm-l6-paraphrase-l3`" in index and "Neighbourhoods did not hold" in index
    provenance = read_provenance(project / "artifacts" / "minilm-l6-int8" / "embeddings.parquet")
    assert provenance["source_dtype"] == "int8 per-row scale" and provenance["tokenizer"]["from"] == "minilm-l6"


def test_second_repro_only_rechecks_the_source(project):
    result = run(["dvc", "repro"], project)
    assert "Stage 'extract@smollm2-135m' didn't change, skipping" in result.stdout


def test_output_reads_in_pandas_polars_and_duckdb(project):
    import duckdb
    import pandas as pd
    import polars as pl

    parquet = project / "artifacts" / "smollm2-135m" / "embeddings.parquet"
    frame = pd.read_parquet(parquet)
    assert frame.shape == (49152, 6)
    assert len(frame["vector"].iloc[0]) == 576

    polars_frame = pl.read_parquet(parquet)
    assert polars_frame.shape == (49152, 6)
    assert polars_frame.schema["vector"] == pl.Array(pl.Float32, 576)

    duck = duckdb.connect()
    rows, dims, hello = duck.execute(
        f"SELECT count(*), max(len(vector)), count(*) FILTER (WHERE token = 'Hello') FROM '{parquet}'"
    ).fetchone()
    assert (rows, dims, hello) == (49152, 576, 1)
    # The same vector through every reader.
    expected = pq.read_table(parquet, columns=["vector"]).column("vector")[42].as_py()
    assert list(frame["vector"].iloc[42]) == expected
    assert polars_frame["vector"][42].to_list() == expected
    assert duck.execute(f"SELECT vector FROM '{parquet}' WHERE token_id = 42").fetchone()[0] == expected


def test_readme_duckdb_queries_run_on_the_output(project, monkeypatch):
    import duckdb

    from project_repo import readme_sql_queries

    queries = readme_sql_queries("embeddings.parquet")
    monkeypatch.chdir(project)
    duck = duckdb.connect()
    hello_rows = duck.execute(queries[0]).fetchall()
    assert sorted(row[1] for row in hello_rows) == [" Hello", "Hello"]
    assert all(len(row[2]) == 10 for row in hello_rows)
    norms = [row[2] for row in duck.execute(queries[1]).fetchall()]
    assert len(norms) == 10 and norms == sorted(norms, reverse=True)
    nearest = duck.execute(queries[2]).fetchall()
    assert len(nearest) == 10 and nearest[0][1] == " Hello" and abs(nearest[0][2] - 1.0) < 1e-6
    assert [row[2] for row in nearest] == sorted((row[2] for row in nearest), reverse=True)
    # The cast the README names makes the array_* functions take the column.
    cast = queries[2].replace("list_cosine_similarity(e.vector, hello.vector)",
                              "array_cosine_similarity(e.vector::FLOAT[576], hello.vector::FLOAT[576])")
    assert [row[0] for row in duck.execute(cast).fetchall()] == [row[0] for row in nearest]


def test_forced_rerun_of_the_default_models_stages_gives_the_same_bytes(project):
    import hashlib

    import yaml

    def output_hashes() -> dict:
        lock = yaml.safe_load((project / "dvc.lock").read_text())
        return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}

    def report_digests() -> dict:
        folder = project / "reports" / "smollm2-135m"
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}

    before, pages = output_hashes(), report_digests()
    assert len(before) >= 15  # every stage's outputs, figures and quantized files included
    # Forced, a target re-runs every stage upstream of it too: fetch to report, and the drift of
    # its q4_0. Every stage's bytes against another machine's: test_the_build_is_the_committed_dvc_lock_and_reports.
    result = run(["dvc", "repro", "--force", "report@smollm2-135m", "drift@smollm2-135m-q4_0"], project)
    for stage in ("extract", "stats", "words", "similarity", "pca", "quantize", "undertrained", "report"):
        assert f"Running stage '{stage}@smollm2-135m'" in result.stdout, stage
    assert output_hashes() == before
    assert report_digests() == pages


def test_report_tells_the_walkthrough_from_the_artifacts(project):
    import json
    import re

    report = (project / "reports" / "smollm2-135m" / "report.md").read_text(encoding="utf-8")
    for heading in ("## 1. The model", "## 2. The matrix", '## 3. `"Hello"` from text to vector', "## 4. Similarity",
                    "## 5. PCA", "## 6. Quantization", "## 7. Under-trained tokens", "## 8. Using the artifacts"):
        assert heading in report
    for image in re.findall(r"!\[[^]]*\]\(([^)]+)\)", report):
        assert (project / "reports" / "smollm2-135m" / image).is_file(), image
    words = pq.read_table(project / "artifacts" / "smollm2-135m" / "words.parquet").to_pylist()
    assert f"**L2 norm:** {words[0]['l2_norm']:.4g}" in report
    stats = json.loads((project / "artifacts" / "smollm2-135m" / "stats.json").read_text())
    assert f"{stats['values']['count']:,}" in report
    assert '`"Greetings"`†' in report  # a split word is marked

    # The usage snippet runs as printed and gives the shape the report states.
    (snippet,) = re.findall(r"```python\n(.*?)```", report, flags=re.S)
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(project)
    try:
        exec(snippet, namespace)  # noqa: S102 - the project's own generated snippet
    finally:
        os.chdir(cwd)
    stated = re.search(r"vectors.shape  # \((\d+), (\d+), (\d+)\)", snippet).groups()
    assert namespace["vectors"].shape == tuple(int(n) for n in stated)


def test_experiment_adding_a_model_runs_only_its_stages(project):
    import json

    # minilm-l6 again under another name: a model the default run does not have
    result = run(["dvc", "exp", "run", "-S", "+model@models.minilm-copy=minilm-l6"], project)
    for stage in ("extract", "stats", "words", "similarity", "pca", "quantize", "undertrained", "report"):
        assert f"Running stage '{stage}@minilm-copy'" in result.stdout, stage
        for other in ("smollm2-135m", "minilm-l6", "minilm-l6-int8", "paraphrase-minilm-l3"):
            assert f"Running stage '{stage}@{other}'" not in result.stdout, (stage, other)
    assert "Running stage 'drift@" not in result.stdout
    assert "Running stage 'compare'" in result.stdout

    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], project).stdout)
    files = {path for workspace in metrics.values() for path in workspace.get("data", {})}
    assert "reports/minilm-copy/headline.json" in files and "reports/smollm2-135m/headline.json" in files
    assert all(path.endswith("headline.json") for path in files)  # the headlines only, not the detail

    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], project).stdout)
    assert diff["reports/minilm-copy/headline.json"]["minilm-copy.vocab"]["new"] == 30522
    assert not any(isinstance(row["new"], str) for rows in diff.values() for row in rows.values())  # numbers only

    shown = run(["dvc", "exp", "show", "--json"], project).stdout
    assert "minilm-copy" in shown and "smollm2-135m" in shown  # the experiment's metrics, beside the baseline's
    run(["dvc", "plots", "diff", "--json"], project)

    index = (project / "reports" / "index.md").read_text(encoding="utf-8")
    assert "[smollm2-135m](smollm2-135m/report.md)" in index and "[minilm-copy](minilm-copy/report.md)" in index
    import yaml

    default_models = len(yaml.safe_load(run(["git", "show", "HEAD:params.yaml"], project).stdout)["models"])
    assert f"{default_models + 1} models from params.yaml" in index
