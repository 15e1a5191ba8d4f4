"""A copy of the project in a new git repository, for the tests that run DVC end to end."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
# series/README.md keeps series/ (a dep of `compare`) in place when params.yaml has no series.
PROJECT_FILES = ["pipeline", "conf", "dvc.yaml", "params.yaml", ".dvc/config", ".dvc/offline-plots.html", ".dvc/.gitignore", ".dvcignore",
                 ".gitignore", "pyproject.toml", "requirements.lock", "series/README.md"]


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """``command`` with the test's Python first on PATH; fails the test unless it succeeds (``check``)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **GIT_IDENTITY, **(env or {})}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if check:
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def copy_project(repo: Path) -> Path:
    """The project's code, config and pipeline in ``repo``, committed as one commit."""
    for name in PROJECT_FILES:
        source = ROOT / name
        target = repo / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    run(["git", "init", "-q", "-b", "main"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "init"], repo)
    return repo


def without_the_series(repo: Path) -> None:
    """conf/config.yaml and params.yaml in ``repo`` without the generated training run (its
    versions and their series stage), for the tests that need the real models only; the
    cluster tests run the series."""
    import yaml

    from pipeline.core.params import compose

    config_file = repo / "conf" / "config.yaml"
    config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    series_versions = {version for versions in config["series"].values() for version in versions}
    config["defaults"] = [entry for entry in config["defaults"]
                          if not (isinstance(entry, dict) and {key.removeprefix("model@models.") for key in entry} <= series_versions)]
    config.pop("models")  # only the versions' step overrides
    config["series"] = {}
    config_file.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    (repo / "params.yaml").write_text(compose(conf_dir=repo / "conf"), encoding="utf-8")


def assert_built_as_committed(repo: Path) -> list[Path]:
    """``repo``'s dvc.lock entries and pages are the committed ones, which a serial `make repro`
    wrote on some other machine: every stage entry (outputs, code and params hashes: a stale
    dvc.lock fails here, `make repro` refreshes it) and every page under reports/. Left out, as
    they depend on which models a project's params.yaml lists: `compare`'s entry and index.md,
    and the series' dep on all of artifacts/. Returns the pages compared."""
    import yaml

    def stages(lock_file: Path) -> dict[str, dict]:
        entries = yaml.safe_load(lock_file.read_text(encoding="utf-8"))["stages"]
        entries.pop("compare", None)
        for entry in entries.values():
            entry["deps"] = [dep for dep in entry.get("deps", []) if dep["path"] != "artifacts"]
        return entries

    built, committed = stages(repo / "dvc.lock"), stages(ROOT / "dvc.lock")
    differing = sorted(name for name, entry in built.items() if committed.get(name) != entry)
    assert not differing, f"not as the committed dvc.lock records them (is it stale? `make repro`): {differing}"
    pages = [p.relative_to(repo) for p in sorted((repo / "reports").rglob("*")) if p.is_file() and p.name != "index.md"]
    assert [str(page) for page in pages if (repo / page).read_bytes() != (ROOT / page).read_bytes()] == []
    return pages


def readme_sql_queries(reading: str) -> list[str]:
    """The queries of README's one ```sql block that mentions ``reading`` (a file it queries)."""
    import re

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    (block,) = [block for block in re.findall(r"```sql\n(.*?)```", readme, flags=re.S) if reading in block]
    return [query for query in block.split(";") if "SELECT" in query]
