"""The registry of measured cases: name -> function(inputs) -> result record.

A case runs in its own process and returns a JSON-able dict with at least ``seconds`` (of
the measured operation) and ``rss_before`` (see :class:`benchmarks.measure.Timer`); the
runner adds the process's wall time, peak RSS and exit status.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchmarks.inputs import Inputs

Case = Callable[["Inputs"], dict]

CASES: dict[str, Case] = {}
# A case still running after this many seconds is stopped and reported with its peak RSS so far.
TIME_LIMITS: dict[str, float] = {}


def case(name: str, time_limit: float | None = None) -> Callable[[Case], Case]:
    def register(function: Case) -> Case:
        CASES[name] = function
        if time_limit:
            TIME_LIMITS[name] = time_limit
        return function

    return register
