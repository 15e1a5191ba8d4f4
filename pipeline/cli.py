"""Entry-point helper shared by every stage's ``main()``."""

from __future__ import annotations

import os
import sys
from typing import Callable

from pipeline.errors import DissectError

DEBUG_ENV = "EMBEDDING_DISSECT_DEBUG"


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
