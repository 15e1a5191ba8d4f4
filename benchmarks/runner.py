"""Running things in their own processes: the measured cases, and the builders of inputs.

A case runs as ``python -m benchmarks.run --child NAME``; the parent waits for it with
``os.wait4``, so the peak RSS reported (``ru_maxrss``) is that process's alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchmarks.inputs import Inputs

REPO = Path(__file__).resolve().parent.parent
POLL_SECONDS = 0.05
# Variables numpy's OpenBLAS reads to pick its kernel; run.py's --best-blas unsets them.
BLAS_PINS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def python_env(**extra: str) -> dict[str, str]:
    """This environment, with the repository importable from any working folder."""
    return dict(os.environ, PYTHONPATH=str(REPO), **extra)


def run_python(args: list[str], cwd: Path = REPO) -> None:
    """``python ARGS`` with this interpreter; a failure stops the benchmark."""
    subprocess.run([sys.executable, *args], cwd=cwd, env=python_env(), check=True)


def run_case(name: str, inputs: Inputs, env: dict, timeout: float | None = None) -> dict:
    """Run case ``name`` in a child and return its record: what the child measured plus the
    process's wall time, peak RSS and exit status. Past ``timeout`` the child is killed and
    reported as stopped, with its peak RSS so far."""
    out = inputs.scratch / f"{name}.json"
    err = inputs.scratch / f"{name}.err"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.run", "--child", name, "--cache", str(inputs.cache),
           "--meta-checkpoint", str(inputs.meta_1b)]
    log(f"case {name}")
    started = time.perf_counter()
    with open(err, "w") as stderr:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    status, usage, timed_out = _wait(proc, started, timeout)
    exit_code = proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: Popen must not wait again
    wall = time.perf_counter() - started
    result = json.loads(out.read_text()) if out.exists() else {}
    result.update({"case": name, "process_seconds": wall, "peak_rss": usage.ru_maxrss * 1024, "exit": exit_code,
                   "cpu_seconds": usage.ru_utime + usage.ru_stime})  # the whole process's, all threads
    if timed_out:
        result.update({"timeout": timeout, "seconds": wall})
        log(f"  stopped after {timeout:.0f} s, peak RSS so far {result['peak_rss'] / 1e9:.2f} GB")
    elif exit_code:
        result["error"] = " | ".join(err.read_text().strip().splitlines()[-3:])
        log(f"  FAILED: {result['error']}")
    else:
        log(f"  {result.get('seconds', float('nan')):.2f} s, peak RSS {result['peak_rss'] / 1e9:.2f} GB")
    return result


def _wait(proc: subprocess.Popen, started: float, timeout: float | None) -> tuple[int, os.struct_rusage, bool]:
    """(wait status, rusage, whether it was killed) of ``proc``. Polled rather than blocking
    so a child past its time limit can be killed and still have its rusage collected."""
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            return status, usage, False
        if timeout and time.perf_counter() - started > timeout:
            proc.kill()
            _, status, usage = os.wait4(proc.pid, 0)
            return status, usage, True
        time.sleep(POLL_SECONDS)
