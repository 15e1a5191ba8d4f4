"""Threads of pipeline.core.parallel: work started in the background."""

from __future__ import annotations

import threading

from pipeline.core.parallel import start_in_background


def test_background_work_runs_on_its_own_thread_and_keeps_its_errors(monkeypatch):
    uncaught = []
    monkeypatch.setattr(threading, "excepthook", uncaught.append)
    ran_on, finished = [], threading.Event()

    def work() -> None:
        ran_on.append(threading.current_thread().name)
        finished.set()

    def failing() -> None:
        finished.set()
        raise RuntimeError("a failed preload")

    start_in_background(work, "load libraries")
    assert finished.wait(10) and ran_on == ["load libraries"]
    finished.clear()
    start_in_background(failing, "failing preload")
    assert finished.wait(10)
    for thread in threading.enumerate():
        if thread.name == "failing preload":
            thread.join(10)
    assert uncaught == []  # dropped there: the work that needs it fails again where it is needed
