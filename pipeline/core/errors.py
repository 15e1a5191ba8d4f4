"""The one error type a user sees.

Every mistake a user can make (a missing file, a wrong tensor key, a tokenizer that does
not fit the model) is raised as :class:`DissectError` with a message that names the
problem and the fix. Stage entry points turn it into one line on stderr and exit status 2
(see :func:`run_stage`); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Callable

DEBUG_ENV = "EMBEDDING_DISSECT_DEBUG"


class DissectError(Exception):
    """A problem with the user's input, described in one line that names the fix."""


# Errors by which the machine refuses a write, whatever the writer (Python, Arrow, numpy):
# the machine's fault, not the program's, so each is told as one line naming the path.
MACHINE_FAULTS = {
    errno.ENOSPC: "no space left on the device; free some space and run the stage again",
    errno.EDQUOT: "the disk quota is exhausted; free some space and run the stage again",
    errno.EROFS: "the file system is read-only; run from a writable copy of the project",
    errno.EACCES: "permission denied; make it writable (or readable) for this user",
    errno.EPERM: "permission denied; make it writable (or readable) for this user",
    errno.EFBIG: "the file is larger than this file system allows; use another disk",
    errno.EIO: "the device reported an input/output error; check the disk",
}


def machine_fault(error: OSError, path: Path | str | None = None) -> DissectError | None:
    """One line for a fault of the machine at ``path`` (or the file ``error`` names), or None
    when ``error`` is not one (a missing input is the caller's to explain)."""
    named = getattr(error, "filename", None)
    where = f"cannot write {path}" if path is not None else f"cannot use {named}" if named else "cannot write an output"
    if named and path is not None and Path(named).parent != Path(path).parent:
        where = f"cannot use {named}"  # the fault is about another file (an input, a folder)
    if error.errno in MACHINE_FAULTS:
        return DissectError(f"{where}: {MACHINE_FAULTS[error.errno]}")
    if path is not None and (error.errno in (errno.EEXIST, errno.ENOTDIR)):
        blocking = next((p for p in Path(path).parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            return DissectError(f"cannot write {path}: {blocking} is a file where a folder should be; move it away and run the stage again")
    if path is not None and error.errno == errno.EISDIR:
        return DissectError(f"cannot write {path}: it is a folder where a file should be; move it away and run the stage again")
    return None


def run_stage(main: Callable[[list[str]], None], argv: list[str] | None = None) -> None:
    """Run a stage; a :class:`DissectError` (or a fault of the machine, :func:`machine_fault`)
    becomes one line on stderr and exit status 2.

    Set ``EMBEDDING_DISSECT_DEBUG=1`` to get the full traceback instead. Run as the process's
    own command (``argv`` None), the stage's objects are left to the operating system when it
    ends (:func:`_leave_objects_to_exit`).
    """
    args = sys.argv[1:] if argv is None else argv
    try:
        try:
            main(args)
        except OSError as error:  # a write outside pipeline.core.io (which names its path itself)
            told = machine_fault(error)
            if told is None:
                raise
            raise told from None
    except DissectError as error:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if argv is None:
        _leave_objects_to_exit()


def _leave_objects_to_exit() -> None:
    """Keep the garbage collector off every object alive now. The process ends next, and its
    shutdown would otherwise walk each of them (torch's and numba's modules hold hundreds of
    thousands) to free memory the operating system takes back anyway: 0.3-0.4 s a stage."""
    import gc

    gc.freeze()
