"""Atomic writes: an interrupted stage never leaves a half-written output behind.

Every output is written to a temporary file in the destination's folder and renamed over
the destination only once it is complete and flushed; on any error the temporary file is
removed and the previous output (if any) is untouched.

A stage that writes several outputs wraps its writes in :func:`output_set`: each file is
still written to its temporary path, but none is renamed until all are complete, so a
failure between two files (a full disk) leaves every previous output in place rather than
a new file beside an old one.

A fault of the machine while writing (disk full, read-only folder, permission denied, a
file where a folder should be) becomes one line naming the path and the cause
(:func:`pipeline.core.errors.machine_fault`), not a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

from pipeline.core.errors import DissectError, machine_fault

TEMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn a fault of the machine inside the block into one line about ``path``."""
    try:
        yield
    except OSError as error:
        told = machine_fault(error, path)
        if told is None:
            raise
        raise told from None


# ---- temporary files ------------------------------------------------------------------------


def _new_temporary(destination: Path) -> Path:
    """An empty file beside ``destination`` named by this process's id and a random part,
    so a second run writing the same output never takes it for a stale one."""
    # Same folder as the destination, so the final rename never crosses file systems.
    fd, name = tempfile.mkstemp(prefix=f".{destination.name}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=destination.parent)
    os.close(fd)
    # mkstemp creates 0600; outputs are ordinary files, readable like any other the user writes.
    os.chmod(name, 0o666 & ~_current_umask())
    return Path(name)


def _temporary_name(destination: Path) -> Path:
    return destination.parent / f".{destination.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"


def _remove_stale_temporaries(destination: Path) -> None:
    """Temporaries a killed run left behind (no ``finally`` runs on SIGKILL) are removed by
    the next write of the same output; those of a process still running are its own."""
    prefix = f".{destination.name}."
    for stale in destination.parent.glob(f"{prefix}*{TEMP_SUFFIX}"):
        parts = stale.name[len(prefix) : -len(TEMP_SUFFIX)].split(".")
        if len(parts) == 2 and parts[0].isdigit():  # <pid>.<random>
            if _process_alive(int(parts[0])):
                continue
        elif len(parts) != 1:  # the temporary of another output (a name this one begins)
            continue
        stale.unlink(missing_ok=True)  # a dead run's, or one named before temporaries held a pid


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    except OverflowError:
        return False
    return True


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- output sets ----------------------------------------------------------------------------


class _OutputSet:
    """Completed temporaries waiting for the rename that puts them all in place at once."""

    def __init__(self) -> None:
        self.pending: list[tuple[Path, Path]] = []  # (temporary, destination)
        self.lock = threading.Lock()

    def add(self, tmp: Path, destination: Path) -> None:
        with self.lock:
            self.pending.append((tmp, destination))

    def temporary_of(self, destination: Path) -> Path | None:
        with self.lock:
            return next((tmp for tmp, dest in reversed(self.pending) if dest == destination), None)

    def commit(self) -> None:
        """Rename every temporary over its destination; if one rename fails, the ones done
        are rolled back from hard-link backups of the previous outputs."""
        done: list[tuple[Path, Path | None]] = []  # (destination, backup of the previous output)
        try:
            for tmp, destination in self.pending:
                with _writing(destination):
                    backup = _backup(destination)
                    try:
                        os.replace(tmp, destination)
                    except BaseException:
                        if backup is not None:
                            backup.unlink(missing_ok=True)
                        raise
                done.append((destination, backup))
        except BaseException:
            for destination, backup in reversed(done):
                with contextlib.suppress(OSError):
                    if backup is not None:
                        os.replace(backup, destination)
                    else:
                        destination.unlink()
            raise
        finally:
            self.discard()
            for _, backup in done:
                if backup is not None:
                    backup.unlink(missing_ok=True)

    def discard(self) -> None:
        for tmp, _ in self.pending:
            tmp.unlink(missing_ok=True)
        self.pending.clear()


def _backup(destination: Path) -> Path | None:
    """A second name for the current output (no bytes copied), or None when there is none."""
    if not destination.is_file():
        return None
    backup = _temporary_name(destination)
    try:
        os.link(destination, backup)
    except OSError:  # a file system without hard links: the rename is still atomic per file
        return None
    return backup


# Writes from any thread of the stage (quantize writes in a second thread) join the set.
_ACTIVE: list[_OutputSet] = []


@contextlib.contextmanager
def output_set() -> Iterator[None]:
    """Replace every output written inside the block together, or none of them.

    Files written inside stay at their temporary paths until the block ends
    (:func:`written_path` finds one); an error inside the block removes them all and
    leaves the previous outputs in place. Nested blocks join the outermost one.
    """
    if _ACTIVE:
        yield
        return
    outputs = _OutputSet()
    _ACTIVE.append(outputs)
    try:
        yield
    except BaseException:
        outputs.discard()
        raise
    finally:
        _ACTIVE.remove(outputs)
    outputs.commit()


def written_path(destination: Path | str) -> Path:
    """Where ``destination``'s new bytes are now: its temporary inside an output set, else itself."""
    destination = Path(destination)
    pending = _ACTIVE[-1].temporary_of(destination) if _ACTIVE else None
    return pending or destination


# ---- writing --------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(destination: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``destination``; rename it over ``destination`` on success
    (at the end of the enclosing :func:`output_set`, if there is one)."""
    destination = Path(destination)
    with _writing(destination):
        destination.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(destination)
        tmp = _new_temporary(destination)
    kept = False
    try:
        with _writing(destination):
            yield tmp
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            if _ACTIVE:
                _ACTIVE[-1].add(tmp, destination)
                kept = True
            else:
                os.replace(tmp, destination)
    finally:
        if not kept:
            tmp.unlink(missing_ok=True)


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
