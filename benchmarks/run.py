"""Benchmark suite: each stage of embedding-dissect against the baseline a user would reach for.

One command (from the repository root, with the project's venv)::

    .venv/bin/python benchmarks/run.py            # everything, ~25 min, writes benchmarks/RESULTS.md
    .venv/bin/python benchmarks/run.py --quick    # skips the 405B shape and sklearn PCA on all rows
    .venv/bin/python benchmarks/run.py --only extract_meta_ours extract_meta_tutorial   # a few cases

The parts: :mod:`benchmarks.inputs` builds the inputs once into a cache folder (``--cache``,
default ``$EMBEDDING_DISSECT_BENCH`` or ``/tmp/embedding-dissect-bench``);
:mod:`benchmarks.cases` holds one function per measured case; :mod:`benchmarks.runner` runs
each case in its own process and takes its peak RSS; :mod:`benchmarks.report` writes
RESULTS.md from the records. Nothing here is a test assertion.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script (benchmarks/run.py), not only with -m
    sys.path.insert(0, str(REPO))

from benchmarks.inputs import DEFAULT_CACHE, Inputs, build_inputs
from benchmarks.runner import BLAS_PINS, log, python_env, run_case


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--meta-checkpoint", type=Path, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--best-blas", action="store_true",
                        help="unset OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE for the measurements (never in tests/CI)")
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    parser.add_argument("--child", help="run this one case here (what the runner starts each case with)")
    return parser.parse_args(argv)


SHORT_CASE_SECONDS = 3.0
SHORT_CASE_RUNS = 3


def child(name: str, inputs: Inputs) -> None:
    """Measure case ``name`` in this process; the record goes to the scratch folder."""
    from benchmarks.cases import CASES

    result = CASES[name](inputs)
    (inputs.scratch / f"{name}.json").write_text(json.dumps(result))


def measure(cases: list[str], inputs: Inputs, best_blas: bool, keep_previous: bool) -> dict:
    """Run ``cases`` one after another, merged into (with ``--only``) the previous run's
    results.json in the cache, which is rewritten after each case."""
    from benchmarks.cases import TIME_LIMITS

    env = python_env(TQDM_DISABLE="1")
    if best_blas:
        for name in BLAS_PINS:
            env.pop(name, None)
    results_file = inputs.cache / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() and keep_previous else {}
    for name in cases:
        results[name] = fastest_run(name, inputs, env, TIME_LIMITS.get(name))
        results_file.write_text(json.dumps(results, indent=1))
    return results


def fastest_run(name: str, inputs: Inputs, env: dict, timeout: float | None) -> dict:
    """The case's record; a case that took under SHORT_CASE_SECONDS is run SHORT_CASE_RUNS times
    and its fastest run kept (with every run's time), so a moment of a shared machine's noise
    does not decide a row of a second or two, nor the limit it is divided by."""
    first = run_case(name, inputs, env, timeout)
    if first.get("exit") or first.get("timeout") or first.get("seconds", SHORT_CASE_SECONDS) >= SHORT_CASE_SECONDS:
        return first
    runs = [first] + [run_case(name, inputs, env, timeout) for _ in range(SHORT_CASE_RUNS - 1)]
    if any(run.get("exit") for run in runs):
        return next(run for run in runs if run.get("exit"))
    best = min(runs, key=lambda run: run["seconds"])
    return {**best, "runs_seconds": [run["seconds"] for run in runs]}


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    inputs = Inputs(args.cache, args.meta_checkpoint)
    if args.child:
        child(args.child, inputs)
        return
    from benchmarks.cases import plan
    from benchmarks.report import write_results

    cases = args.only or plan(args.quick)
    build_inputs(inputs, cases)
    results = measure(cases, inputs, args.best_blas, keep_previous=bool(args.only))
    write_results(args.results, results, inputs, args)
    log(f"wrote {args.results}")


if __name__ == "__main__":
    main(sys.argv[1:])
