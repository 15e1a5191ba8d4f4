"""The DVC remote on S3, against moto's S3 server on localhost: one clone runs and pushes,
others pull and recompute nothing, compare commits and read artifacts from the remote
alone; and the ways a remote fails (unreachable, wrong credentials, no bucket, an
interrupted transfer, outputs never pushed), each one line with nothing lost locally.

The pipeline is the project's own, on the default model, run to two small targets
(`stats` and `undertrained`, with `fetch` and `extract` before them) to keep it short.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

import moto_s3
from project_repo import GIT_IDENTITY, ROOT, copy_project, run

pytestmark = pytest.mark.slow  # `dvc repro`, push and pull of the default model: minutes

MODEL = "smollm2-135m"
TARGETS = [f"stats@{MODEL}", f"undertrained@{MODEL}"]
# The stages run here and every output upstream of them (the other stages have no dvc.lock
# entry in these clones; a plain `dvc pull` is for a fully run pipeline).
PULL = ["pull", "--with-deps", *TARGETS]
BUCKET = "team"
URL = f"s3://{BUCKET}/embedding-dissect"
EMBEDDINGS = f"artifacts/{MODEL}/embeddings.parquet"
# Commit "one" runs with params.yaml as it is; commit "two" with these lines changed.
SECOND = {"  norm_histogram_bins: 50": "  norm_histogram_bins: 20", "  percentile: 2.0": "  percentile: 5.0"}


@dataclass
class Team:
    origin: Path  # the bare git repository everyone clones
    a: Path  # the clone that ran the pipeline and pushed


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()  # noqa: S324 - DVC's content hash


def edit_params(repo: Path, changes: dict[str, str]) -> None:
    params = repo / "params.yaml"
    text = params.read_text(encoding="utf-8")
    for old, new in changes.items():
        assert old in text, old
        text = text.replace(old, new)
    params.write_text(text, encoding="utf-8")


def cached_outs(repo: Path, lock_text: str | None = None) -> dict[str, str]:
    """path -> md5 of every output dvc.lock records that DVC caches (all but models/)."""
    lock = yaml.safe_load(lock_text if lock_text is not None else (repo / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])
            if not out["path"].startswith("models/")}


def snapshot(repo: Path) -> dict[str, tuple[int, float]]:
    """Size and modification time of every file of the workspace's artifacts and the local cache."""
    files = [p for folder in ("artifacts", ".dvc/cache") for p in (repo / folder).rglob("*") if p.is_file()]
    return {str(p.relative_to(repo)): (p.stat().st_size, p.stat().st_mtime) for p in files}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = moto_s3.start(tmp_path_factory.mktemp("s3"), buckets=(BUCKET,))
    yield server
    server.stop()


def dvc(args: list[str], cwd: Path, s3, env: dict[str, str] | None = None, check: bool = True):
    return run(["dvc", *args], cwd, {**s3.credentials, **(env or {})}, check)


def wrapper(args: list[str], cwd: Path, s3, env: dict[str, str] | None = None):
    env = {**s3.credentials, "PYTHONPATH": str(ROOT), **(env or {})}
    return run([sys.executable, "-m", "pipeline.remote", *args], cwd, env, check=False)


@pytest.fixture(scope="module")
def team(tmp_path_factory, s3) -> Team:
    """Clone A: the remote added and committed, two commits run and pushed with the run-cache."""
    root = tmp_path_factory.mktemp("team")
    (root / "a").mkdir()
    a = copy_project(root / "a")
    dvc(["remote", "add", "-d", "storage", URL], a, s3)
    dvc(["remote", "modify", "--local", "storage", "endpointurl", s3.endpoint], a, s3)
    assert "endpointurl" not in (a / ".dvc" / "config").read_text()  # only in config.local
    run(["git", "commit", "-qam", "remote"], a)
    assert run(["git", "check-ignore", ".dvc/config.local"], a).stdout.strip() == ".dvc/config.local"

    dvc(["repro", *TARGETS], a, s3)
    run(["git", "add", "-A"], a)
    run(["git", "commit", "-qm", "one"], a)
    assert "files pushed" in dvc(["push", "--run-cache"], a, s3).stdout
    edit_params(a, SECOND)
    dvc(["repro", *TARGETS], a, s3)
    run(["git", "add", "-A"], a)
    run(["git", "commit", "-qm", "two"], a)
    dvc(["push", "--run-cache"], a, s3)
    assert run(["git", "status", "--porcelain"], a).stdout == ""

    origin = root / "origin.git"
    run(["git", "init", "-q", "--bare", str(origin)], root)
    run(["git", "push", "-q", str(origin), "main"], a)
    return Team(origin, a)


def clone(team: Team, dest: Path, s3, endpoint: str | None = None, branch: str = "main") -> Path:
    run(["git", "clone", "-q", "-b", branch, str(team.origin), str(dest)], dest.parent)
    dvc(["remote", "modify", "--local", "storage", "endpointurl", endpoint or s3.endpoint], dest, s3)
    return dest


@pytest.fixture
def stage_log(tmp_path) -> tuple[dict[str, str], Path]:
    """An environment whose `python` records its arguments: every stage command DVC runs."""
    shim, log = tmp_path / "shim", tmp_path / "stages.log"
    shim.mkdir()
    (shim / "python").write_text(f'#!/bin/sh\necho "$*" >> "{log}"\nexec "{sys.executable}" "$@"\n')
    (shim / "python").chmod(0o755)
    return {"PATH": f"{shim}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}, log


def stages_run(log: Path) -> list[str]:
    lines = log.read_text().splitlines() if log.exists() else []
    return [line.split()[1] for line in lines if line.startswith("-m pipeline.stages.")]


def test_pull_brings_every_artifact_and_runs_no_stage(team, s3, tmp_path, stage_log):
    env, log = stage_log
    b = clone(team, tmp_path / "b", s3)
    result = dvc(PULL, b, s3, env)
    assert "Running stage" not in result.stdout + result.stderr
    assert stages_run(log) == []
    outs = cached_outs(b)
    assert {EMBEDDINGS, f"artifacts/{MODEL}/stats.json", f"artifacts/{MODEL}/undertrained.json"} <= set(outs)
    for path, expected in outs.items():
        assert md5(b / path) == expected, path
        assert (b / path).read_bytes() == (team.a / path).read_bytes(), path  # byte for byte what A made
    assert not (b / "models").exists()  # the model itself is not shared: fetch takes it from its pinned source


def test_repro_pull_runs_only_fetch_and_the_run_cache_restores_older_params(team, s3, tmp_path, stage_log):
    env, log = stage_log
    b = clone(team, tmp_path / "b", s3)
    result = dvc(["repro", "--pull", *TARGETS], b, s3, env)
    assert stages_run(log) == ["pipeline.stages.fetch"]  # always_changed: it re-checks the pinned model
    assert re.findall(r"Running stage '([^']+)'", result.stdout) == [f"fetch@{MODEL}"]
    for stage in ("extract", "stats"):
        assert f"Pulling data for stage: '{stage}@{MODEL}'" in result.stdout, stage
    for path, expected in cached_outs(b).items():
        assert md5(b / path) == expected, path
    assert run(["git", "status", "--porcelain"], b).stdout == ""

    # A local rerun of a pulled stage hashes the same as the pulled outputs.
    dvc(["repro", "--force", "--single-item", f"stats@{MODEL}"], b, s3, env)
    assert run(["git", "status", "--porcelain"], b).stdout == ""

    # Parameters set back to commit one's: restored from the run-cache A pushed, not recomputed.
    log.unlink()
    edit_params(b, {new: old for old, new in SECOND.items()})
    result = dvc(["repro", "--pull", *TARGETS], b, s3, env)
    for stage in ("stats", "undertrained"):
        assert f"Stage '{stage}@{MODEL}' is cached - skipping run, checking out outputs" in result.stdout, stage
    assert stages_run(log) == ["pipeline.stages.fetch"]
    first = cached_outs(b, run(["git", "show", "HEAD~1:dvc.lock"], b).stdout)
    for path, expected in first.items():
        assert md5(b / path) == expected, path


def test_metrics_and_plots_diff_two_commits_from_the_remote_alone(team, s3, tmp_path):
    b = clone(team, tmp_path / "b", s3)
    # undertrained.json is a plain output (the headline files are the declared metrics, and
    # these clones never run the report stage that writes them): named as a target, DVC diffs it.
    target = f"artifacts/{MODEL}/undertrained.json"
    diff = json.loads(dvc(["metrics", "diff", "HEAD~1", "HEAD", "--targets", target, "--json"], b, s3).stdout)
    undertrained = diff[f"artifacts/{MODEL}/undertrained.json"]
    assert undertrained["percentile"] == {"old": 2.0, "new": 5.0, "diff": 3.0}
    assert undertrained["flagged"]["new"] > undertrained["flagged"]["old"]

    plots = json.loads(dvc(["plots", "diff", "HEAD~1", "HEAD", "--json"], b, s3).stdout)
    hist = f"artifacts/{MODEL}/norm_hist.json"
    # (The errors are the plots of stages these clones never ran.)
    assert not [error for error in plots.get("errors", []) if error["name"] == hist]
    (plot,) = plots["data"][hist]
    rows = plot["content"]["data"]["values"]
    bins = {rev: sum(row["rev"] == rev for row in rows) for rev in ("HEAD~1", "HEAD")}
    assert bins == {"HEAD~1": 50, "HEAD": 20}  # each commit's own histogram
    assert not (b / "artifacts").exists()  # nothing pulled into the workspace


def readme_section() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    return readme.split("## Sharing artifacts through a remote", 1)[1].split("\n## ", 1)[0]


def consumer_env(s3, monkeypatch) -> dict[str, str]:
    """A machine with read access to the bucket and no clone: credentials and endpoint in the environment."""
    env = {**s3.credentials, "AWS_ENDPOINT_URL": s3.endpoint}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def test_readme_dvc_api_snippet_reads_the_remote_with_pyarrow(team, s3, tmp_path, monkeypatch, capsys):
    (snippet,) = [block for block in re.findall(r"```python\n(.*?)```", readme_section(), flags=re.S) if "dvc.api" in block]
    assert '"https://github.com/your-team/embedding-dissect"' in snippet
    snippet = snippet.replace('"https://github.com/your-team/embedding-dissect"', repr(str(team.origin)))
    consumer_env(s3, monkeypatch)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(snippet, namespace)  # noqa: S102 - the README's own snippet
    assert namespace["table"].equals(pq.read_table(team.a / EMBEDDINGS))
    printed = capsys.readouterr().out
    stated = re.search(r"print\(.*\)  # (.*)", snippet).group(1)
    assert printed.strip() == stated

    # Any commit: rev picks which one.
    import dvc.api

    stats = {rev: json.loads(dvc.api.read(f"artifacts/{MODEL}/undertrained.json", repo=str(team.origin), rev=rev))
             for rev in ("main~1", "main")}
    assert (stats["main~1"]["percentile"], stats["main"]["percentile"]) == (2.0, 5.0)


def test_readme_dvc_get_then_duckdb(team, s3, tmp_path, monkeypatch):
    import duckdb

    (block,) = [block for block in re.findall(r"```sh\n(.*?)```", readme_section(), flags=re.S) if "dvc get" in block]
    get_line, duck_line = block.strip().splitlines()
    command = get_line.replace("https://github.com/your-team/embedding-dissect", str(team.origin)).split()
    assert command[:2] == ["dvc", "get"]
    run(command, tmp_path, consumer_env(s3, monkeypatch))
    query = re.fullmatch(r'duckdb -c "(.*)"', duck_line).group(1)
    monkeypatch.chdir(tmp_path)
    rows = duckdb.connect().execute(query).fetchall()
    table = pq.read_table(team.a / EMBEDDINGS, columns=["token_id", "token"]).to_pylist()
    assert rows == [(row["token_id"], row["token"]) for row in table if row["token"] == " Hello"]


@pytest.fixture(scope="module")
def pulled(team, s3, tmp_path_factory) -> Path:
    """A teammate's clone with every artifact pulled: the faults below must leave it as it is."""
    b = clone(team, tmp_path_factory.mktemp("pulled") / "b", s3)
    dvc(PULL, b, s3)
    return b


def one_line(result) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_unreachable_remote(team, pulled, s3, tmp_path):
    before = snapshot(pulled)
    closed = f"http://127.0.0.1:{moto_s3.free_port()}"
    fresh = clone(team, tmp_path / "fresh", s3, endpoint=closed)
    dvc(["remote", "modify", "--local", "storage", "endpointurl", closed], pulled, s3)
    try:
        for repo, command in ((pulled, ["push"]), (fresh, PULL)):
            line = one_line(wrapper(command, repo, s3))
            assert line.startswith(f"error: remote 'storage' ({URL}) cannot be reached at {closed}; "), line
            assert "dvc remote modify --local storage endpointurl" in line
        raw = dvc(PULL, pulled, s3, check=False)
        assert raw.returncode != 0 and "Could not connect to the endpoint URL" in raw.stderr
    finally:
        dvc(["remote", "modify", "--local", "storage", "endpointurl", s3.endpoint], pulled, s3)
    assert snapshot(pulled) == before
    assert snapshot(fresh) == {} and run(["git", "status", "--porcelain"], fresh).stdout == ""


@pytest.mark.parametrize("credentials", [{"AWS_SECRET_ACCESS_KEY": "wrong"}, {"AWS_ACCESS_KEY_ID": "AKIANOTAKEY"}])
def test_wrong_credentials(pulled, s3, credentials):
    before = snapshot(pulled)
    for command in (PULL, ["push"]):
        line = one_line(wrapper(command, pulled, s3, credentials))
        assert line.startswith(f"error: remote 'storage' ({URL}) refused the credentials; set AWS_ACCESS_KEY_ID"), line
    raw = dvc(["push"], pulled, s3, credentials, check=False)
    assert raw.returncode != 0
    assert snapshot(pulled) == before


def test_bucket_that_does_not_exist(team, pulled, s3, tmp_path):
    before = snapshot(pulled)
    fresh = clone(team, tmp_path / "fresh", s3)  # a pull that needs the remote: nothing is cached here
    missing = "s3://no-such-bucket/embedding-dissect"
    dvc(["remote", "modify", "--local", "storage", "url", missing], pulled, s3)
    dvc(["remote", "modify", "--local", "storage", "url", missing], fresh, s3)
    try:
        for repo, command in ((pulled, ["push"]), (fresh, PULL)):
            line = one_line(wrapper(command, repo, s3))
            assert line.startswith(f"error: bucket 'no-such-bucket' of remote 'storage' ({missing}) "
                                   f"does not exist at {s3.endpoint}; create it"), line
        assert "bucket does not exist" in dvc(PULL, fresh, s3, check=False).stderr
    finally:
        dvc(["remote", "modify", "--local", "--unset", "storage", "url"], pulled, s3)
    assert snapshot(pulled) == before
    assert snapshot(fresh) == {} and run(["git", "status", "--porcelain"], fresh).stdout == ""
    assert "no-such-bucket" not in {bucket["Name"] for bucket in s3.client().list_buckets()["Buckets"]}


def objects(s3, prefix: str) -> dict[str, bytes]:
    listing = s3.client().list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/files/md5/")
    return {item["Key"]: s3.client().get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
            for item in listing.get("Contents", [])}


def kill_after(command: list[str], cwd: Path, s3, done: callable) -> None:
    """Start ``command`` with every cached object's request slowed, and kill it once ``done()``."""
    s3.pause.write_text("0.4")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **GIT_IDENTITY, **s3.credentials}
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not done() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert process.poll() is None, "the transfer finished before it could be interrupted"
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        s3.pause.write_text("0")


def completed(s3, method: str, prefix: str) -> int:
    return sum(1 for m, path, status, *_ in s3.requests() if m == method and status == "200"
               and path.startswith(f"/{BUCKET}/{prefix}/files/md5/"))


def test_interrupted_push_resumes_and_nothing_half_written_counts(pulled, s3, tmp_path):
    prefix = "interrupted-push"
    dvc(["remote", "modify", "--local", "storage", "url", f"s3://{BUCKET}/{prefix}"], pulled, s3)
    try:
        kill_after(["dvc", "push", "-j", "1"], pulled, s3, lambda: completed(s3, "PUT", prefix) >= 2)
        halfway = objects(s3, prefix)
        expected = set(cached_outs(pulled).values())
        assert 0 < len(halfway) < len(expected)
        for key, body in halfway.items():  # every object there is whole: its content hashes to its name
            assert "".join(key.split("/")[-2:]) == hashlib.md5(body).hexdigest(), key  # noqa: S324
        # The resumed push sends only what is missing (an upload that was cut off is not there).
        pushed = int(re.search(r"(\d+) files? pushed", dvc(["push"], pulled, s3).stdout).group(1))
        assert 0 < pushed <= len(expected) - len(halfway)
        assert {"".join(key.split("/")[-2:]) for key in objects(s3, prefix)} == expected
    finally:
        dvc(["remote", "modify", "--local", "--unset", "storage", "url"], pulled, s3)
    # What the resumed push left on the remote is what a fresh clone pulls, byte for byte.
    fresh = clone(Team(pulled, pulled), tmp_path / "fresh", s3)
    dvc(["remote", "modify", "--local", "storage", "url", f"s3://{BUCKET}/{prefix}"], fresh, s3)
    dvc(PULL, fresh, s3)
    for path, expected_md5 in cached_outs(fresh).items():
        assert md5(fresh / path) == expected_md5, path


def test_interrupted_pull_resumes_and_nothing_half_written_counts(team, s3, tmp_path):
    b = clone(team, tmp_path / "b", s3)
    before = completed(s3, "GET", "embedding-dissect")
    kill_after(["dvc", *PULL, "-j", "1"], b, s3, lambda: completed(s3, "GET", "embedding-dissect") >= before + 2)
    cache = b / ".dvc" / "cache" / "files" / "md5"
    whole = [p for p in cache.rglob("*") if p.is_file() and re.fullmatch(r"[0-9a-f]{30}", p.name)]
    assert whole, "nothing was fetched before the kill"
    for path in whole:  # in the cache under its hash only once it is complete
        assert path.parent.name + path.name == md5(path), path
    outs = cached_outs(b)
    for path, expected in outs.items():  # in the workspace: absent, or whole
        assert not (b / path).exists() or md5(b / path) == expected, path
    assert any(not (b / path).exists() for path in outs)
    dvc(PULL, b, s3)
    for path, expected in outs.items():
        assert md5(b / path) == expected, path


def test_pull_of_a_commit_never_pushed_names_the_stage(team, pulled, s3, tmp_path):
    # A teammate commits a new parameter and its outputs, pushes the commit to git but not to DVC.
    author = clone(team, tmp_path / "author", s3)
    dvc(PULL, author, s3)
    run(["git", "checkout", "-q", "-b", "unpushed"], author)
    edit_params(author, {"  percentile: 5.0": "  percentile: 3.0"})
    dvc(["repro", "--single-item", f"undertrained@{MODEL}"], author, s3)
    run(["git", "commit", "-qam", "undertrained at 3%"], author)
    run(["git", "push", "-q", "origin", "unpushed"], author)

    other = clone(team, tmp_path / "other", s3, branch="unpushed")
    line = one_line(wrapper(PULL, other, s3))
    assert line.startswith("error: 2 output(s) of this commit are neither in the local cache nor on remote 'storage'"), line
    assert f"artifacts/{MODEL}/undertrained.parquet" in line and f"artifacts/{MODEL}/undertrained.json" in line
    assert f"run `dvc repro undertrained@{MODEL}` here to make them, or `dvc push` from the clone that ran it" in line
    raw = dvc(PULL, other, s3, check=False)
    assert raw.returncode != 0 and "Checkout failed for following targets" in raw.stderr
    # Everything that was pushed arrived all the same.
    outs = cached_outs(other)
    for path in (EMBEDDINGS, f"artifacts/{MODEL}/stats.json"):
        assert md5(other / path) == outs[path], path
