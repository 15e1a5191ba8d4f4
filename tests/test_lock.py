"""requirements.lock and pyproject.toml agree, and the lock pins everything with hashes.

pyproject.toml keeps ranges for people who install the package as a library; the pipeline
runs with the exact versions of requirements.lock (`make lock` regenerates it). These
tests fail when someone edits one and not the other.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
PYPROJECT = ROOT / "pyproject.toml"
HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class Pin:
    line: str
    requirement: Requirement
    hashes: tuple[str, ...]

    @property
    def version(self) -> Version | None:
        specifiers = list(self.requirement.specifier)
        if len(specifiers) == 1 and specifiers[0].operator == "==" and "*" not in specifiers[0].version:
            return Version(specifiers[0].version)
        return None


def lock_entries(text: str) -> tuple[list[str], dict[str, Pin]]:
    """The lock's option lines (``--extra-index-url ...``) and its pins by canonical name."""
    options: list[str] = []
    pins: dict[str, Pin] = {}
    for logical in re.sub(r"\\\n", " ", text).splitlines():
        line = logical.split(" #", 1)[0].strip() if not logical.lstrip().startswith("#") else ""
        if not line:
            continue
        if line.startswith("-"):
            options.append(line)
            continue
        spec, *hash_parts = re.split(r"\s+(?=--hash)", line)
        requirement = Requirement(spec)
        pins[canonicalize_name(requirement.name)] = Pin(spec, requirement, tuple(hash_parts))
    return options, pins


def declared(pyproject: dict) -> list[tuple[str, Requirement]]:
    """Every requirement pyproject.toml states: runtime, each extra, and the build system."""
    found = [("dependencies", Requirement(text)) for text in pyproject["project"]["dependencies"]]
    for extra, texts in pyproject["project"].get("optional-dependencies", {}).items():
        found += [(f"optional-dependencies.{extra}", Requirement(text)) for text in texts]
    found += [("build-system.requires", Requirement(text)) for text in pyproject["build-system"]["requires"]]
    return found


def disagreements(pyproject: dict, lock_text: str) -> list[str]:
    """What is wrong between a pyproject and a lock, one sentence each; [] when they agree."""
    problems = []
    options, pins = lock_entries(lock_text)
    for section, requirement in declared(pyproject):
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        pin = pins.get(canonicalize_name(requirement.name))
        if pin is None:
            problems.append(f"{requirement.name} ({section}) is not pinned in the lock")
        elif pin.version is None:
            problems.append(f"{pin.line} is not an exact == pin")
        elif not requirement.specifier.contains(pin.version, prereleases=True):
            problems.append(f"the lock pins {pin.line}, outside pyproject's {requirement} ({section})")
    for pin in pins.values():
        if pin.version is None:
            problems.append(f"{pin.line} is not an exact == pin")
        if not pin.hashes or not all(HASH.fullmatch(part) for part in pin.hashes):
            problems.append(f"{pin.line} has no sha256 --hash")
    torch = pins.get("torch")
    if torch is not None and torch.version is not None and torch.version.local:
        if not any(option.startswith(("--extra-index-url", "--index-url", "--find-links")) for option in options):
            problems.append(f"{torch.line} is a local build but the lock names no index that serves it")
    for option in options:
        if "file:" in option or re.search(r"\s/", option):
            problems.append(f"the lock option {option!r} points at this machine's disk")
    return problems


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def lock_text() -> str:
    return LOCK.read_text(encoding="utf-8")


def test_pyproject_and_the_lock_agree(pyproject, lock_text):
    problems = disagreements(pyproject, lock_text)
    assert not problems, "pyproject.toml and requirements.lock disagree; run `make lock`:\n" + "\n".join(problems)


def test_the_lock_pins_the_cpu_build_of_torch_with_its_hash(lock_text):
    options, pins = lock_entries(lock_text)
    torch = pins["torch"]
    assert torch.version is not None and torch.version.local is not None, "torch must be pinned to one build"
    if torch.version.local == "cpu":
        assert "--extra-index-url https://download.pytorch.org/whl/cpu" in options
        # The sha256 of torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl.
        if torch.version == Version("2.13.0+cpu"):
            assert "--hash=sha256:6746dbcbeb526eb61330b76b41ff1b4eb848951103a892eeb080dfa2b264667b" in torch.hashes


def test_the_lock_is_for_a_python_that_pyproject_allows(pyproject, lock_text):
    found = re.search(r"autogenerated by pip-compile with Python (\d+\.\d+)", lock_text)
    assert found, "the lock's header does not say which Python it was compiled for"
    assert SpecifierSet(pyproject["project"]["requires-python"]).contains(found.group(1))


def test_every_library_that_decides_output_bytes_is_locked(lock_text):
    from pipeline.core.environment import OUTPUT_LIBRARIES

    _, pins = lock_entries(lock_text)
    assert not [name for name in OUTPUT_LIBRARIES if canonicalize_name(name) not in pins]


# The checker itself, on small made-up files: it must be able to fail.

SMALL_PYPROJECT = {
    "build-system": {"requires": ["setuptools>=68"]},
    "project": {
        "dependencies": ["numpy>=1.26,<3", "torch>=2.2,<3", "tomli>=2; python_version < '3.0'"],
        "optional-dependencies": {"test": ["pytest>=8,<10"]},
    },
}
SMALL_LOCK = """\
#
# This file is autogenerated by pip-compile with Python 3.11
#
--extra-index-url https://download.pytorch.org/whl/cpu

numpy==2.4.6 \\
    --hash=sha256:{a}
    # via embedding-dissect (pyproject.toml)
pytest==9.2.0 \\
    --hash=sha256:{a} \\
    --hash=sha256:{b}
setuptools==84.2.1 --hash=sha256:{a}
torch==2.13.0+cpu \\
    --hash=sha256:{b}
""".format(a="0" * 64, b="f" * 64)


def test_the_checker_accepts_an_agreeing_pair():
    assert disagreements(SMALL_PYPROJECT, SMALL_LOCK) == []


def test_the_checker_reports_a_pin_outside_the_range():
    narrowed = {**SMALL_PYPROJECT, "project": {**SMALL_PYPROJECT["project"], "dependencies": ["numpy>=1.26,<2"]}}
    assert disagreements(narrowed, SMALL_LOCK) == [
        "the lock pins numpy==2.4.6, outside pyproject's numpy<2,>=1.26 (dependencies)"
    ]


def test_the_checker_reports_a_missing_pin_a_missing_hash_and_a_loose_pin():
    lock = SMALL_LOCK.replace("numpy==2.4.6", "numpy>=2.4").replace(f"setuptools==84.2.1 --hash=sha256:{'0' * 64}", "")
    lock += "six==1.17.0\n"
    assert disagreements(SMALL_PYPROJECT, lock) == [
        "numpy>=2.4 is not an exact == pin",
        "setuptools (build-system.requires) is not pinned in the lock",
        "numpy>=2.4 is not an exact == pin",
        "six==1.17.0 has no sha256 --hash",
    ]


def test_the_checker_wants_an_index_for_a_local_torch_build_and_no_local_paths():
    without_index = SMALL_LOCK.replace("--extra-index-url https://download.pytorch.org/whl/cpu\n", "")
    assert disagreements(SMALL_PYPROJECT, without_index) == [
        "torch==2.13.0+cpu is a local build but the lock names no index that serves it"
    ]
    with_local = SMALL_LOCK.replace("\n\nnumpy", "\n--find-links /opt/wheels\n\nnumpy")
    assert disagreements(SMALL_PYPROJECT, with_local) == [
        "the lock option '--find-links /opt/wheels' points at this machine's disk"
    ]
