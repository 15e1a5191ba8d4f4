"""Progress bars on stderr, the same everywhere."""

from __future__ import annotations

import os
import sys

from tqdm import tqdm


def progress_bar(total: int | None, desc: str, unit: str = "it", enabled: bool = True) -> tqdm:
    """A tqdm bar on stderr; silenced by ``enabled=False`` or ``EMBEDDING_DISSECT_NO_PROGRESS=1`` (tests, logs)."""
    disable = not enabled or bool(os.environ.get("EMBEDDING_DISSECT_NO_PROGRESS"))
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=disable, dynamic_ncols=True, mininterval=0.5)
