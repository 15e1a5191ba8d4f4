"""The pipeline on a Dask LocalCluster of 2 worker processes, shared through moto's S3
server: six versions of the synthetic checkpoint series and their series stage. Every
computing stage runs exactly once across the workers, the driver then recomputes nothing,
its dvc.lock and pages are the committed ones (a serial `make repro`), the planted movers
are found, and a worker killed in the middle of a task costs a rerun of that task and
nothing else."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

import moto_s3
from project_repo import assert_built_as_committed, copy_project, run

pytestmark = pytest.mark.slow  # a cluster, an S3 server and six small models: minutes

BUCKET = "team"
VERSIONS = [f"run-step-{step}" for step in range(6)]
SERIES = "run-demo"


def series_only_params(repo: Path, versions: list[str]) -> None:
    """params.yaml with ``versions`` and nothing else to run; their series only when all six are there."""
    params = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
    params["models"] = {name: params["models"][name] for name in versions}
    params["series"] = {SERIES: VERSIONS} if versions == VERSIONS else {}
    params["drift"]["pairs"] = {}
    params["export"]["models"] = []
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = moto_s3.start(tmp_path_factory.mktemp("s3"), buckets=(BUCKET,))
    yield server
    server.stop()


def new_project(root: Path, s3, prefix: str, versions: list[str] = VERSIONS) -> Path:
    """The project with only ``versions`` to run, committed, its remote at s3://team/<prefix>."""
    root.mkdir(parents=True)
    repo = copy_project(root)
    series_only_params(repo, versions)
    env = s3.credentials
    run(["dvc", "remote", "add", "-d", "storage", f"s3://{BUCKET}/{prefix}"], repo, env)
    run(["dvc", "remote", "modify", "--local", "storage", "endpointurl", s3.endpoint], repo, env)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "series only"], repo)
    return repo


@pytest.fixture
def cluster_env(s3, monkeypatch):
    """The S3 credentials in this process's environment, which the worker processes inherit."""
    for key, value in {**s3.credentials, "EMBEDDING_DISSECT_NO_PROGRESS": "1"}.items():
        monkeypatch.setenv(key, value)


@contextmanager
def new_client():
    """A client of a new LocalCluster of 2 worker processes; both closed on leaving (a client
    given a cluster does not close it)."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, Client(cluster) as client:
        yield client


def log_events(log: Path) -> list[tuple[str, str, int]]:
    """(start|done, task label, worker pid) per line pipeline.cluster's tasks logged."""
    return [(event, label, int(pid)) for event, label, pid, _ in (line.split() for line in log.read_text().splitlines())]


def test_two_workers_run_every_stage_once_and_the_driver_recomputes_nothing(tmp_path, s3, cluster_env):
    from pipeline.cluster import run_on_cluster

    repo = new_project(tmp_path / "driver", s3, "cluster")
    log = tmp_path / "tasks.log"
    started = time.perf_counter()
    with new_client() as client:
        reports, driver_output = run_on_cluster(repo, client, log=str(log), progress=False)
    print(f"cluster, 2 workers, driver included: {time.perf_counter() - started:.1f} s; tasks: "
          + ", ".join(f"{r.label} {r.seconds:.1f} s ({len(r.ran)} ran)" for r in reports))

    ran = Counter(stage for report in reports for stage in report.ran)
    computing = {stage: count for stage, count in ran.items() if not stage.startswith("fetch@")}
    per_version = ["extract", "stats", "words", "similarity", "pca", "quantize", "undertrained"]
    expected = {f"{stage}@{v}": 1 for v in VERSIONS for stage in per_version} | {f"series@{SERIES}": 1}
    assert computing == expected
    assert len({report.worker_pid for report in reports}) == 2  # both workers took tasks
    # The driver computes nothing: every computing stage is restored from the run-cache; it
    # runs fetch (models/ is never pushed) and renders the committed pages.
    from pipeline.cluster import RAN, RESTORED

    on_driver = [stage for stage in RAN.findall(driver_output) if not stage.startswith("fetch@")]
    assert sorted(on_driver) == sorted([*(f"report@{v}" for v in VERSIONS), "compare"])
    assert set(expected) <= set(RESTORED.findall(driver_output))
    assert assert_built_as_committed(repo)  # and the driver rendered pages
    # The planted movers, read from the driver's restored outputs.
    from pipeline.core.io import read_json
    from pipeline.sources.synthetic import PLANTED_MOVERS, planted_movers

    metrics = read_json(repo / "series" / SERIES / "series.json")
    found = {m["token_id"]: m["moved_most_at_step"] for m in metrics["top_moved"][:PLANTED_MOVERS]}
    assert found == planted_movers(30522, seed=0)


def test_a_worker_killed_mid_task_costs_one_rerun(tmp_path, s3, cluster_env):
    from pipeline.cluster import run_on_cluster

    repo = new_project(tmp_path / "driver", s3, "killed", VERSIONS[:3])  # three tasks are enough to lose one
    log = tmp_path / "tasks.log"
    log.touch()
    victim: dict[str, object] = {}

    def kill_the_first_task_started() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            starts = [e for e in log_events(log) if e[0] == "start"]
            if starts:
                time.sleep(3)  # well inside the task: cloned, `dvc repro` under way
                _, label, pid = starts[0]
                victim.update(label=label, pid=pid)
                os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_the_first_task_started)
    killer.start()
    with new_client() as client:
        reports, driver_output = run_on_cluster(repo, client, log=str(log), progress=False)
    killer.join()

    assert victim, "no task started"
    events = log_events(log)
    starts = Counter(label for event, label, _ in events if event == "start")
    assert starts[victim["label"]] == 2  # the killed attempt, and the rerun elsewhere
    assert all(count == 1 for label, count in starts.items() if label != victim["label"])
    assert ("done", victim["label"], victim["pid"]) not in events
    assert assert_built_as_committed(repo)  # and the driver rendered pages
