"""The one error type a user sees.

Every mistake a user can make (a missing file, a wrong tensor key, a tokenizer that does
not fit the model) is raised as :class:`DissectError` with a message that names the
problem and the fix. Stage entry points turn it into one line on stderr and exit status 2
(see :func:`run_stage`); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

DEBUG_ENV = "EMBEDDING_DISSECT_DEBUG"


class DissectError(Exception):
    """A problem with the user's input, described in one line that names the fix."""


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
