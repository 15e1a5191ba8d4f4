"""The command line of every stage: ``python -m pipeline.stages.<stage> [TARGET]``.

Every stage module has the same contract, ``run(paths, settings)``: ``paths`` comes from
:mod:`pipeline.core.paths` (the one object that knows the artifact layout) and ``settings``
is the stage's typed settings, built and checked from params.yaml by
:mod:`pipeline.core.settings` before any work starts. params.yaml's ``compute`` section sets
where the products run for every stage (:mod:`pipeline.core.device`). A module's ``main = Stage(...).main`` wires the two
together for ``dvc repro``; tests and notebooks call ``run`` directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

from pipeline.core.device import use_compute_settings
from pipeline.core.errors import DissectError
from pipeline.core.params import NAME_RULE, asks_for_help, load_params

# What each kind of target names, in the stage's help and in its errors.
TARGET_NOUNS = {"MODEL": "model", "PAIR": "drift pair", "SERIES": "series"}

P = TypeVar("P")
S = TypeVar("S")


@dataclass(frozen=True)
class Stage(Generic[P, S]):
    """How one stage's command line becomes ``run(paths, settings)``.

    ``target`` names what the stage's argument is (``MODEL``, ``PAIR``, or None for a stage
    that takes none); ``paths`` and ``settings`` build the two arguments from params.yaml
    and that target, ``settings`` validating every value before ``run`` starts.
    """

    name: str
    target: str | None
    paths: Callable[[dict[str, Any], str | None], P]
    settings: Callable[[dict[str, Any], str | None], S]
    run: Callable[[P, S], object]

    def main(self, argv: list[str]) -> None:
        usage = f"usage: python -m pipeline.stages.{self.name}" + (f" {self.target}" if self.target else "")
        if asks_for_help(argv):
            print(f"{usage}\n{self._how_it_runs()}")
            return
        expected = 0 if self.target is None else 1
        if self.target is not None and len(argv) > 1:
            # DVC splits `cmd: ... ${key}` at spaces, so a name holding one arrives as several words.
            raise DissectError(f"{self._target_noun()} name {' '.join(argv)!r} holds a space; use {NAME_RULE}: rename it in conf/ and params.yaml")
        if len(argv) != expected:
            raise DissectError(usage)
        target = argv[0] if argv else None
        params = load_params()
        settings = self.settings(params, target)
        use_compute_settings(params)
        self.run(self.paths(params, target), settings)

    def _how_it_runs(self) -> str:
        if self.target is None:
            return f"Its settings come from params.yaml; `dvc repro {self.name}` runs it."
        return f"{self.target}: a {self._target_noun()} named in params.yaml, which holds the settings; `dvc repro {self.name}@{self.target}` runs it."

    def _target_noun(self) -> str:
        return TARGET_NOUNS.get(self.target or "", (self.target or "").lower())
