"""Entry-point helper shared by every stage's ``main()``."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

from pipeline.core.errors import DissectError

DEBUG_ENV = "EMBEDDING_DISSECT_DEBUG"
ARTIFACTS_DIR = Path("artifacts")


def run_stage(main: Callable[[list[str]], None], argv: list[str] | None = None) -> None:
    """Run a stage; a :class:`DissectError` becomes one line on stderr and exit status 2.

    Set ``EMBEDDING_DISSECT_DEBUG=1`` to get the full traceback instead.
    """
    args = sys.argv[1:] if argv is None else argv
    try:
        main(args)
    except DissectError as error:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def model_stage_main(stage: str, run: Callable[[Path, dict[str, Any]], object]) -> Callable[[list[str]], None]:
    """The ``main(argv)`` of a per-model stage: ``python -m pipeline.<stage> MODEL`` calls
    ``run(artifacts/MODEL, params.yaml's <stage> section)``."""

    def main(argv: list[str]) -> None:
        from pipeline.core.params import load_params, stage_settings

        if len(argv) != 1:
            raise DissectError(f"usage: python -m pipeline.stages.{stage} MODEL_NAME")
        run(ARTIFACTS_DIR / argv[0], stage_settings(load_params(), stage))

    return main
