"""The pipeline's stages as tasks on a Dask cluster, shared through the DVC remote.

    python -m pipeline.cluster                          # a LocalCluster of 2 worker processes
    python -m pipeline.cluster --workers 4
    python -m pipeline.cluster --scheduler tcp://10.0.0.5:8786 --repo git@forge:team/dissect.git
    DASK_SCHEDULER_ADDRESS=tcp://10.0.0.5:8786 python -m pipeline.cluster --repo ...

Dask schedules; DVC computes and caches. Each task is one model's computing stages
(``extract@M`` ... ``undertrained@M``, ``export@M`` when M is exported), then, once those
are done, each drift pair, then each series. A task clones the project at the driver's
commit into a workspace of its own, writes the driver's params.yaml there, runs
``dvc repro --pull`` on its targets (whatever another task already pushed is restored from
DVC's run-cache instead of recomputed) and ``dvc push --run-cache``. When every task is
done, the driver runs ``dvc pull --run-cache`` and ``dvc repro --pull`` in its own
workspace: every computing stage is restored from the run-cache, none runs again, and
dvc.lock is the one a serial ``dvc repro`` writes (the outputs are byte-identical on any
machine; see README, "Reproducibility"). The driver renders the pages itself (``report@M``
and ``compare``, a few seconds each): they are committed, ``cache: false`` outputs, which
DVC's run-cache restores only on the machine that ran them.

A worker that dies mid-task: Dask runs the task again on another worker, in a fresh
workspace. Nothing half-pushed is used: DVC restores a stage from the run-cache only when
every output it records is in the cache (S3 writes each object whole), else it runs the
stage.

``fetch`` is ``always_changed``: every workspace that needs a model's files runs it (it
re-creates or re-checks ``models/<name>`` against the pinned sha256; models/ is never
pushed), so it runs in more than one task; every other stage runs once.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from pipeline.core.errors import DissectError, run_stage
from pipeline.core.params import load_params
from pipeline.core.progress import progress_bar

SCHEDULER_ENV = "DASK_SCHEDULER_ADDRESS"
# Where task workspaces go on a worker (default: the system's temporary folder).
WORKDIR_ENV = "EMBEDDING_DISSECT_WORKDIR"
# Files of the driver's workspace a task may see differ from its commit: what the run is.
RUN_FILES = ("params.yaml", "dvc.lock")
# Stages whose outputs are the committed pages (cache: false): rendered by the driver.
RENDERING = ("report", "compare")
RAN = re.compile(r"^Running stage '([^']+)'", re.M)
RESTORED = re.compile(r"^Stage '([^']+)' (?:is cached - skipping run|didn't change, skipping)", re.M)


# --------------------------------------------------------------------------------------
# The plan: which stages form which task, in which order


@dataclass(frozen=True)
class Task:
    label: str  # what the progress bar and the report call it
    targets: tuple[str, ...]  # DVC stage names given to `dvc repro`
    layer: int  # 0: per model; 1: drift pairs; 2: series


def stage_names(dvc_yaml: dict[str, Any], params: dict[str, Any]) -> dict[str, list[str]]:
    """Each stage of dvc.yaml -> its DVC names (``extract@M`` per model, ``compare`` alone)."""
    collections = {
        "${models}": list(params.get("models") or {}),
        "${export.models}": list((params.get("export") or {}).get("models") or []),
        "${drift.pairs}": list(((params.get("drift") or {}).get("pairs")) or {}),
        "${series}": list(params.get("series") or {}),
    }
    names = {}
    for stage, body in dvc_yaml["stages"].items():
        loop = body.get("foreach")
        if loop is None:
            names[stage] = [stage]
        elif loop in collections:
            names[stage] = [f"{stage}@{key}" for key in collections[loop]]
        else:
            raise DissectError(f"dvc.yaml stage {stage!r} loops over {loop}, which pipeline.cluster does not know how to split into tasks")
    return names


def plan(dvc_yaml: dict[str, Any], params: dict[str, Any]) -> list[Task]:
    """The tasks, per model first; a later layer starts when the one before is done.

    The rendering stages (RENDERING) are left to the driver: they write the committed,
    uncached markdown, which DVC's run-cache does not carry between machines, so the
    driver would render it again anyway.
    """
    names = stage_names(dvc_yaml, params)
    per_model = [stage for stage, body in dvc_yaml["stages"].items()
                 if body.get("foreach") == "${models}" and stage not in RENDERING]
    exported = set((params.get("export") or {}).get("models") or [])
    tasks = []
    for model in params.get("models") or {}:
        targets = [f"{stage}@{model}" for stage in per_model] + ([f"export@{model}"] if model in exported else [])
        tasks.append(Task(model, tuple(targets), 0))
    tasks += [Task(name, (name,), 1) for name in names.get("drift", [])]
    tasks += [Task(name, (name,), 2) for name in names.get("series", [])]
    planned = {target for task in tasks for target in task.targets}
    left = sorted(name for stage, stage_list in names.items() if stage not in RENDERING
                  for name in stage_list if name not in planned and not name.startswith("fetch@"))
    if left:
        raise DissectError(f"pipeline.cluster has no task for {', '.join(left)}; add the stage to pipeline.cluster.plan")
    return tasks


# --------------------------------------------------------------------------------------
# One task, on a worker


@dataclass(frozen=True)
class Job:
    task: Task
    repo: str  # what `git clone` reads: the driver's folder, or a URL every worker reaches
    commit: str
    run_files: dict[str, str]  # params.yaml (and dvc.lock) as the driver has them
    config_local: str | None  # the driver's .dvc/config.local: the remote's endpoint, credentials
    log: str | None = None  # a file every attempt appends "start"/"done" lines to (tests)


@dataclass
class TaskReport:
    label: str
    worker_pid: int
    seconds: float
    ran: list[str] = field(default_factory=list)  # stages DVC computed in this task
    restored: list[str] = field(default_factory=list)  # stages DVC restored or found unchanged


def tool_env() -> dict[str, str]:
    """The worker's environment with its Python's folder first on PATH, so `dvc` and the
    stages' `python -m` are the ones of the environment Dask runs in."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def run_checked(command: list[str], cwd: Path, what: str) -> str:
    result = subprocess.run(command, cwd=cwd, env=tool_env(), capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr.strip() or result.stdout.strip()).splitlines()[-3:]
        raise DissectError(f"{what} failed in {cwd} ({' '.join(command[:4])} ...): {' | '.join(tail)}")
    return result.stdout + result.stderr


def run_task(job: Job) -> TaskReport:
    """Clone, reproduce the task's targets (restoring what the run-cache has), push."""
    started = time.perf_counter()
    _log(job, "start")
    root = os.environ.get(WORKDIR_ENV) or None
    workspace = Path(tempfile.mkdtemp(prefix=f"dissect-{job.task.label}-", dir=root))
    try:
        run_checked(["git", "clone", "--quiet", "--no-checkout", job.repo, str(workspace)], workspace.parent, "git clone")
        run_checked(["git", "checkout", "--quiet", job.commit], workspace, "git checkout")
        for name, text in job.run_files.items():
            (workspace / name).write_text(text, encoding="utf-8")
        if job.config_local is not None:
            (workspace / ".dvc" / "config.local").write_text(job.config_local, encoding="utf-8")
        output = run_checked([sys.executable, "-m", "dvc", "repro", "--pull", *job.task.targets], workspace, f"dvc repro of {job.task.label}")
        run_checked([sys.executable, "-m", "dvc", "push", "--run-cache", "--with-deps", *job.task.targets], workspace, f"dvc push of {job.task.label}")
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    _log(job, "done")
    return TaskReport(job.task.label, os.getpid(), time.perf_counter() - started, RAN.findall(output), RESTORED.findall(output))


def _log(job: Job, event: str) -> None:
    if job.log:
        with open(job.log, "a", encoding="utf-8") as log:
            log.write(f"{event} {job.task.label} {os.getpid()} {time.time():.3f}\n")


# --------------------------------------------------------------------------------------
# The driver


def driver_state(project: Path) -> tuple[str, dict[str, str], str | None]:
    """The commit tasks check out, the run files they get, the remote config they use."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True)
    if head.returncode != 0:
        raise DissectError(f"{project} is not a git repository with a commit; workers check out a commit: commit the project first")
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=project, capture_output=True, text=True).stdout
    edited = sorted(line[3:] for line in changed.splitlines() if line[3:] not in RUN_FILES)
    if edited:
        raise DissectError(f"{', '.join(edited[:3])} differ from HEAD, and workers check out HEAD; commit them first (only params.yaml may differ)")
    run_files = {name: (project / name).read_text(encoding="utf-8") for name in RUN_FILES if (project / name).is_file()}
    local = project / ".dvc" / "config.local"
    return head.stdout.strip(), run_files, local.read_text(encoding="utf-8") if local.is_file() else None


def check_remote(project: Path) -> None:
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        if not repo.config["core"].get("remote"):
            raise DissectError("tasks share their results through the default DVC remote, and none is set; "
                               "add one with `dvc remote add -d storage s3://BUCKET/PREFIX` (README, \"Share artifacts through a remote\")")


def run_plan(client: Any, tasks: list[Task], job_of: Any, progress: bool = True) -> list[TaskReport]:
    """Submit every task, each layer after the one before; a bar over all of them."""
    from distributed import as_completed

    reports: list[TaskReport] = []
    previous: list[Any] = []
    futures = []
    for layer in sorted({task.layer for task in tasks}):
        # A task waits for the whole layer before it: Dask passes the finished reports in.
        layer_futures = [client.submit(_after, job_of(task), previous, key=f"dissect-{task.label}-{layer}", pure=False)
                         for task in tasks if task.layer == layer]
        futures += layer_futures
        previous = layer_futures
    with progress_bar(len(futures), "cluster tasks", "task", enabled=progress) as bar:
        for future in as_completed(futures):
            report = future.result()  # a task that failed for good raises here, with its one line
            reports.append(report)
            bar.set_postfix_str(report.label)
            bar.update(1)
    return reports


def _after(job: Job, finished: list[TaskReport]) -> TaskReport:
    return run_task(job)


def finish_on_driver(project: Path) -> str:
    """Pull the run-cache and reproduce: every stage restored, dvc.lock written."""
    # --allow-missing: dvc.lock may still name outputs of an earlier run that no remote has;
    # what this run needs comes with the run-cache records, and `repro --pull` fetches it.
    run_checked([sys.executable, "-m", "dvc", "pull", "--run-cache", "--allow-missing"], project, "dvc pull --run-cache")
    return run_checked([sys.executable, "-m", "dvc", "repro", "--pull"], project, "dvc repro --pull")


def run_on_cluster(project: Path, client: Any, repo: str | None = None, log: str | None = None,
                   progress: bool = True) -> tuple[list[TaskReport], str]:
    """The whole pipeline of ``project`` on ``client``'s cluster, then restored on the driver."""
    project = project.resolve()
    commit, run_files, config_local = driver_state(project)
    check_remote(project)
    dvc_yaml = yaml.safe_load((project / "dvc.yaml").read_text(encoding="utf-8"))
    params = load_params(project / "params.yaml")
    tasks = plan(dvc_yaml, params)

    def job_of(task: Task) -> Job:
        return Job(task, repo or str(project), commit, run_files, config_local, log)

    reports = run_plan(client, tasks, job_of, progress)
    return reports, finish_on_driver(project)


def connect(scheduler: str | None, workers: int) -> Any:
    """A client of the scheduler at ``scheduler`` (or $DASK_SCHEDULER_ADDRESS), else of a new LocalCluster."""
    from distributed import Client, LocalCluster

    address = scheduler or os.environ.get(SCHEDULER_ENV)
    if address:
        return Client(address)
    # One thread per worker: each task's stages use the worker's cores through BLAS.
    return Client(LocalCluster(n_workers=workers, threads_per_worker=1, processes=True))


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scheduler", help=f"address of a running Dask scheduler (default: ${SCHEDULER_ENV}, else a LocalCluster)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of the LocalCluster (default 2)")
    parser.add_argument("--repo", help="git URL the workers clone (default: this folder; on a real cluster, a URL every worker reaches)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(list(argv))


def main(argv: Sequence[str]) -> None:
    args = parse_args(argv)
    if args.workers < 1:
        raise DissectError("--workers must be 1 or more")
    driver_state(Path.cwd())  # refuse an uncommitted project or a missing remote before a cluster starts
    check_remote(Path.cwd())
    with connect(args.scheduler, args.workers) as client:
        print(f"cluster: dashboard at {client.dashboard_link}", file=sys.stderr)
        started = time.perf_counter()
        reports, _ = run_on_cluster(Path.cwd(), client, args.repo, progress=not args.quiet)
    ran = sum(len(r.ran) for r in reports)
    busiest = max(reports, key=lambda r: r.seconds)
    print(f"cluster: {len(reports)} tasks, {ran} stage runs, {time.perf_counter() - started:.0f} s in all "
          f"(longest task {busiest.label}: {busiest.seconds:.0f} s); every computing stage restored here from the run-cache", file=sys.stderr)


if __name__ == "__main__":
    run_stage(main)
