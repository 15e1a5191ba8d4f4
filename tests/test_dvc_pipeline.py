"""`dvc repro` end to end in a fresh git repository, on the default real model."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.parquet import read_provenance, read_vectors

ROOT = Path(__file__).resolve().parent.parent
PROJECT_FILES = ["pipeline", "conf", "dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore", ".gitignore", "pyproject.toml"]


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the project in a new git repo, with `dvc repro` run once."""
    repo = tmp_path_factory.mktemp("repo")
    for name in PROJECT_FILES:
        source = ROOT / name
        target = repo / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    run(["git", "init", "-q"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], repo)
    run(["dvc", "repro"], repo)
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


def test_second_repro_only_rechecks_the_source(project):
    result = run(["dvc", "repro"], project)
    assert "Stage 'extract@smollm2-135m' didn't change, skipping" in result.stdout


def test_output_reads_in_pandas_polars_and_duckdb(project):
    import duckdb
    import pandas as pd
    import polars as pl

    parquet = project / "artifacts" / "smollm2-135m" / "embeddings.parquet"
    frame = pd.read_parquet(parquet)
    assert frame.shape == (49152, 4)
    assert len(frame["vector"].iloc[0]) == 576

    polars_frame = pl.read_parquet(parquet)
    assert polars_frame.shape == (49152, 4)
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
    import re

    import duckdb

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    (block,) = re.findall(r"```sql\n(.*?)```", readme, flags=re.S)
    queries = [query for query in block.split(";") if "SELECT" in query]
    monkeypatch.chdir(project)
    duck = duckdb.connect()
    hello_rows = duck.execute(queries[0]).fetchall()
    assert sorted(row[1] for row in hello_rows) == [" Hello", "Hello"]
    assert all(len(row[2]) == 10 for row in hello_rows)
    norms = [row[2] for row in duck.execute(queries[1]).fetchall()]
    assert len(norms) == 10 and norms == sorted(norms, reverse=True)


def test_forced_rerun_gives_the_same_dvc_hashes(project):
    import yaml

    def output_hashes() -> dict:
        lock = yaml.safe_load((project / "dvc.lock").read_text())
        return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}

    before = output_hashes()
    run(["dvc", "repro", "--force", "extract@smollm2-135m"], project)
    assert output_hashes() == before
