"""Typed stage settings, checked by one validator before a stage does any work.

A stage declares its settings as a frozen dataclass whose fields carry a rule::

    @dataclass(frozen=True)
    class SimilaritySettings:
        k: int = setting(10, whole_number(1, 10_000))
        scope: str = setting("words", one_of("words", "all"))

and :func:`read_section` builds it from a section of params.yaml. Every mistake stops the
stage with one line that names the param as the user writes it, what it may hold and what
it holds now: ``similarity.k must be a whole number from 1 to 10000, got "ten"``. A key the
section does not know (a typo) is refused the same way rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar

from pipeline.core.errors import DissectError

T = TypeVar("T")
Rule = Callable[[Any, str], Any]  # (value, "section.key") -> the checked value, or DissectError


def shown(value: Any) -> str:
    """A value as the user wrote it in YAML: strings quoted, long ones cut."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _refuse(where: str, expected: str, value: Any) -> DissectError:
    return DissectError(f"{where} must be {expected}, got {shown(value)}")


def whole_number(minimum: int = 1, maximum: int | None = None) -> Rule:
    """An int (not a bool, not 2.0 or "2") within [minimum, maximum]."""
    expected = f"a whole number ≥ {minimum}" if maximum is None else f"a whole number from {minimum} to {maximum}"

    def check(value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _refuse(where, expected, value)
        if value < minimum or (maximum is not None and value > maximum):
            raise _refuse(where, expected, value)
        return value

    return check


def real_number(minimum: float, maximum: float, *, open_interval: bool = False) -> Rule:
    """A finite int or float within [minimum, maximum], or strictly between them when ``open_interval``."""
    expected = f"a number {'between' if open_interval else 'from'} {minimum:g} {'and' if open_interval else 'to'} {maximum:g}"
    if open_interval:
        expected += " (both excluded)"

    def check(value: Any, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _refuse(where, expected, value)
        outside = value <= minimum or value >= maximum if open_interval else value < minimum or value > maximum
        if outside:
            raise _refuse(where, expected, value)
        return float(value)

    return check


def one_of(*choices: Any) -> Rule:
    expected = "one of " + ", ".join(str(choice) for choice in choices)

    def check(value: Any, where: str) -> Any:
        if isinstance(value, bool) or value not in choices:
            raise _refuse(where, expected, value)
        return value

    return check


def boolean() -> Rule:
    def check(value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise _refuse(where, "true or false", value)
        return value

    return check


def string(*, allow_empty: bool = False) -> Rule:
    expected = "text" if allow_empty else "non-empty text"

    def check(value: Any, where: str) -> str:
        if not isinstance(value, str) or (not allow_empty and not value):
            raise _refuse(where, expected, value)
        return value

    return check


def list_of(item: Rule, *, min_items: int = 0, max_items: int | None = None, unique: bool = False) -> Rule:
    """A YAML list whose every item passes ``item``; kept a list (provenance records it as written)."""
    size = f"a list of {min_items} or more items" if max_items is None else f"a list of {min_items} to {max_items} items"

    def check(value: Any, where: str) -> list[Any]:
        if not isinstance(value, list) or len(value) < min_items or (max_items is not None and len(value) > max_items):
            raise _refuse(where, size, value)
        checked = [item(element, f"{where}[{index}]") for index, element in enumerate(value)]
        if unique:
            seen: set[Any] = set()
            for index, element in enumerate(checked):
                if element in seen:
                    raise DissectError(f"{where}[{index}] repeats {shown(element)}; list each entry once")
                seen.add(element)
        return checked

    return check


def optional(rule: Rule) -> Rule:
    """``null`` or what ``rule`` accepts."""

    def check(value: Any, where: str) -> Any:
        return None if value is None else rule(value, where)

    return check


def setting(default: Any, rule: Rule, *, key: str | None = None, recorded: bool = True) -> Any:
    """A settings field: its default (used when params.yaml leaves the key out), its rule, its
    name in params.yaml when that is not a good Python name (``words.list``), and whether the
    provenance of the stage's outputs records it (not a list of targets that only says which
    stages DVC runs, like ``export.models``)."""
    metadata = {"rule": rule, "key": key, "recorded": recorded}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _key(field: dataclasses.Field) -> str:
    return field.metadata.get("key") or field.name


def as_params(settings: Any) -> dict[str, Any]:
    """The settings as params.yaml spells them, for the provenance of what a stage wrote."""
    return {_key(field): getattr(settings, field.name) for field in dataclasses.fields(settings) if field.metadata.get("recorded", True)}


def read_section(cls: type[T], section: Any, name: str) -> T:
    """``cls`` built from params.yaml's ``name`` section, every field checked by its rule."""
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise DissectError(f"{name} must be a mapping of settings, got {shown(section)}; recompose params.yaml with `python -m pipeline.core.params`")
    fields = {_key(field): field for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(str(key) for key in section if key not in fields)
    if unknown:
        raise DissectError(f"{name}.{unknown[0]} is not a setting of {name} (known: {', '.join(fields)}); remove it or fix its spelling")
    values = {}
    for key, field in fields.items():
        if key in section:
            values[field.name] = field.metadata["rule"](section[key], f"{name}.{key}")
    return cls(**values)


def from_section(cls: type[T], name: str) -> Callable[[Mapping[str, Any], str | None], T]:
    """The settings reader of a stage configured by one params.yaml section."""

    def read(params: Mapping[str, Any], target: str | None = None) -> T:
        return read_section(cls, params.get(name), name)

    return read


@dataclass(frozen=True)
class NoSettings:
    """The settings of a stage that params.yaml does not configure (report, compare)."""


def no_settings(params: Mapping[str, Any], target: str | None = None) -> NoSettings:
    return NoSettings()
