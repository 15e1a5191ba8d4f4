"""pipeline.cluster's plan: which DVC stages form which task, and what the driver refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.cluster import RAN, RESTORED, Task, driver_state, plan
from pipeline.core.errors import DissectError

from project_repo import ROOT, run

PARAMS = {
    "models": {"a": {}, "b": {}},
    "export": {"models": ["b"]},
    "drift": {"pairs": {"a-b": {"base": "x", "other": "y"}}},
    "series": {"ab": ["a", "b"]},
}


def project_dvc_yaml() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))


def test_a_task_per_model_then_per_pair_then_per_series_and_the_pages_left_to_the_driver():
    tasks = plan(project_dvc_yaml(), PARAMS)
    per_model = ("fetch", "extract", "stats", "words", "similarity", "pca", "quantize", "undertrained")
    assert tasks[:2] == [
        Task("a", tuple(f"{stage}@a" for stage in per_model), 0),
        Task("b", (*(f"{stage}@b" for stage in per_model), "export@b"), 0),
    ]
    assert tasks[2:] == [Task("drift@a-b", ("drift@a-b",), 1), Task("series@ab", ("series@ab",), 2)]


def test_a_stage_the_plan_cannot_place_is_refused():
    dvc_yaml = project_dvc_yaml()
    dvc_yaml["stages"]["mystery"] = {"foreach": "${elsewhere}", "do": {"cmd": "true"}}
    with pytest.raises(DissectError, match=r"loops over \$\{elsewhere\}"):
        plan(dvc_yaml, PARAMS)
    dvc_yaml["stages"]["mystery"] = {"cmd": "true"}
    with pytest.raises(DissectError, match="no task for mystery"):
        plan(dvc_yaml, PARAMS)


def test_the_stage_lines_dvc_prints_are_read():
    output = ("Running stage 'stats@a':\n> python -m pipeline.stages.stats a\n"
              "Stage 'extract@a' is cached - skipping run, checking out outputs\n"
              "Stage 'fetch@a' didn't change, skipping\n")
    assert RAN.findall(output) == ["stats@a"]
    assert RESTORED.findall(output) == ["extract@a", "fetch@a"]


def test_the_driver_refuses_code_that_differs_from_its_commit(tmp_path: Path):
    run(["git", "init", "-q", "-b", "main"], tmp_path)
    for name in ("params.yaml", "code.py"):
        (tmp_path / name).write_text("one\n")
    run(["git", "add", "-A"], tmp_path)
    run(["git", "commit", "-qm", "one"], tmp_path)
    (tmp_path / "params.yaml").write_text("two\n")  # what the run is: handed to every task
    commit, files, config_local = driver_state(tmp_path)
    assert files["params.yaml"] == "two\n" and config_local is None and len(commit) == 40
    (tmp_path / "code.py").write_text("two\n")
    with pytest.raises(DissectError, match="code.py differ from HEAD, and workers check out HEAD; commit them first"):
        driver_state(tmp_path)
