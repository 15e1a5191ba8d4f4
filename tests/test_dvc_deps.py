"""dvc.yaml's code deps cannot drift from the code: each stage lists exactly its import closure.

A stage re-runs when a file it depends on changes, so a module the stage imports but
dvc.yaml does not list would let a change slip through with stale outputs, and a listed
module the stage never imports would re-run it for nothing. The closure is computed from
the source (every ``import`` inside the ``pipeline`` package, lazy ones in functions too,
plus the ``__init__.py`` of every package on the way), not by importing anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def module_file(module: str) -> Path | None:
    """The source file of a ``pipeline`` module or package, relative to the project root."""
    base = Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if (ROOT / candidate).is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """The ``pipeline`` modules that ``path`` imports, anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse((ROOT / path).read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
            found.add(node.module)
            # `from pipeline.report import markdown` imports a module, not a name
            found.update(f"{node.module}.{alias.name}" for alias in node.names if module_file(f"{node.module}.{alias.name}"))
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "pipeline")
    return found


def with_packages(module: str) -> set[str]:
    """``module`` and every package above it, whose ``__init__`` runs on import."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def import_closure(module: str) -> set[Path]:
    """Every source file that ``python -m <module>`` can execute from the ``pipeline`` package."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        for name in with_packages(current):
            if name in seen:
                continue
            seen.add(name)
            path = module_file(name)
            if path is not None:
                todo.extend(imported_modules(path))
    return {path for name in seen if (path := module_file(name)) is not None}


def stage_code_deps() -> dict[str, tuple[str, set[Path], list[str]]]:
    """stage name -> (its module, its import closure, the pipeline/ deps dvc.yaml lists)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    found = {}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        module = body["cmd"].split()[2]  # python -m pipeline.stages.<stage> ...
        listed = [dep for dep in body.get("deps", []) if isinstance(dep, str) and dep.startswith("pipeline")]
        found[name] = (module, import_closure(module), listed)
    return found


def covered(path: Path, listed: list[str]) -> bool:
    return any(path == Path(dep) or Path(dep) in path.parents for dep in listed)


STAGES = stage_code_deps()


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_dvc_yaml_lists_every_module_the_stage_imports(stage: str) -> None:
    module, closure, listed = STAGES[stage]
    missing = sorted(str(path) for path in closure if not covered(path, listed))
    assert not missing, f"dvc.yaml stage {stage!r} ({module}) does not list: {missing}; run `python tests/test_dvc_deps.py`"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_dvc_yaml_lists_no_module_the_stage_does_not_import(stage: str) -> None:
    module, closure, listed = STAGES[stage]
    unused = [dep for dep in listed if not any(path == Path(dep) or Path(dep) in path.parents for path in closure)]
    assert not unused, f"dvc.yaml stage {stage!r} ({module}) lists modules it never imports: {unused}; run `python tests/test_dvc_deps.py`"


def test_closure_follows_lazy_imports_and_packages(tmp_path: Path) -> None:
    # The pca stage imports the PCA engine, which imports the kNN helpers; the report
    # package's __init__ runs when one of its modules is imported.
    closure = import_closure("pipeline.stages.pca")
    assert Path("pipeline/core/pca.py") in closure
    assert Path("pipeline/core/knn.py") in closure
    assert Path("pipeline/report/__init__.py") in closure
    assert Path("pipeline/__init__.py") in closure
    assert Path("pipeline/formats/gguf.py") not in closure


def listed_deps(closure: set[Path]) -> list[str]:
    """The pipeline/ deps to write for ``closure``: a package folder whose every module is in it, else the files."""
    files = sorted(map(str, closure))
    folders = []
    for folder in ("pipeline/formats", "pipeline/quant"):
        members = {str(path.relative_to(ROOT)) for path in (ROOT / folder).glob("*.py")}
        if members <= set(files):
            files = [name for name in files if name not in members]
            folders.append(folder)
    return sorted(files + folders)


def rewrite_dvc_yaml() -> None:
    """Replace each stage's run of ``- pipeline/...`` deps in dvc.yaml by its import closure, comments kept."""
    import re

    deps = stage_code_deps()
    lines = (ROOT / "dvc.yaml").read_text(encoding="utf-8").split("\n")
    out: list[str] = []
    stage = None
    dep_line = re.compile(r"^(\s+)- pipeline[/\w.]*$")
    index = 0
    while index < len(lines):
        line = lines[index]
        if match := re.match(r"^  (\w+):$", line):
            stage = match.group(1)
        found = dep_line.match(line)
        if found and stage in deps:
            while index < len(lines) and dep_line.match(lines[index]):
                index += 1
            out.extend(f"{found.group(1)}- {name}" for name in listed_deps(deps[stage][1]))
            continue
        out.append(line)
        index += 1
    (ROOT / "dvc.yaml").write_text("\n".join(out), encoding="utf-8")


if __name__ == "__main__":
    rewrite_dvc_yaml()  # python tests/test_dvc_deps.py: bring dvc.yaml's code deps in line with the imports
