"""Atomic writes: an interrupted stage never leaves a half-written output behind.

Every output is written to a temporary file in the destination's folder and renamed over
the destination only once it is complete and flushed; on any error the temporary file is
removed and the previous output (if any) is untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from pipeline.core.errors import DissectError


@contextlib.contextmanager
def atomic_path(destination: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``destination``; rename it over ``destination`` on success."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(destination)
    # Same folder as the destination, so the final rename never crosses file systems.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600; outputs are ordinary files, readable like any other the user writes.
    os.chmod(tmp, 0o666 & ~_current_umask())
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, destination)
    finally:
        tmp.unlink(missing_ok=True)


def _remove_stale_temporaries(destination: Path) -> None:
    """Temporaries a killed run left behind (no ``finally`` runs on SIGKILL) are removed
    by the next write of the same output."""
    for stale in destination.parent.glob(f".{destination.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(destination: Path | str, data: bytes) -> None:
    with atomic_path(destination) as tmp:
        tmp.write_bytes(data)


def read_json(path: Path | str) -> Any:
    """A JSON artifact an earlier stage wrote; a missing one says which command builds it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DissectError(f"{path} is missing; run the stage that writes it (`dvc repro`)") from None


def write_json_atomic(destination: Path | str, obj: Any) -> None:
    """Write JSON with sorted keys and a trailing newline, so equal content gives equal bytes."""
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    write_bytes_atomic(destination, text.encode("utf-8"))
