"""Whole pipeline stages on the 1B and the 405B shape, each as DVC runs it:
``python -m pipeline.stages.<stage> MODEL`` in the model's prepared project folder."""

from __future__ import annotations

import os
import runpy
import sys

from benchmarks.cases.registry import case
from benchmarks.inputs import M1B, M405B, Inputs
from benchmarks.measure import Timer

STAGES = ("extract", "stats", "words", "similarity", "pca", "quantize", "report")
# The 405B shape's PCA reduces a 16384 x 16384 covariance on one thread: past this, it is
# stopped and reported with its peak RSS so far, which is what the 405B shape is run for.
PCA_405B_TIME_LIMIT = 1800.0


def run_stage_cli(stage: str, model: str) -> None:
    """``python -m pipeline.stages.<stage> MODEL``, in this process: runpy is what ``-m``
    runs, so the stage's CLI is the whole contract, and its imports are timed with it and
    seen by the torch check. A stage that fails exits non-zero, and so does the case."""
    sys.argv = [sys.argv[0], model]
    runpy.run_module(f"pipeline.stages.{stage}", run_name="__main__", alter_sys=True)


def stage_case(model: str, stage: str):
    def run(inputs: Inputs) -> dict:
        os.chdir(inputs.project(model))
        with Timer() as t:
            run_stage_cli(stage, model)
        return {**t.result, "torch_imported": "torch" in sys.modules}

    return run


def register() -> None:
    for model in (M1B, M405B):
        case(f"fetch_{model}")(stage_case(model, "fetch"))
        for stage in STAGES:
            limit = PCA_405B_TIME_LIMIT if (model, stage) == (M405B, "pca") else None
            case(f"stage_{stage}_{model}", time_limit=limit)(stage_case(model, stage))


register()
