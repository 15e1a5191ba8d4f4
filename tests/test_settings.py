"""The one settings validator: every rule by hand, and the messages a user reads."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.core.errors import DissectError
from pipeline.core.settings import (
    as_params,
    boolean,
    list_of,
    one_of,
    read_section,
    real_number,
    setting,
    string,
    whole_number,
)


@dataclass(frozen=True)
class Toy:
    k: int = setting(10, whole_number(1, 100))
    scope: str = setting("words", one_of("words", "all"))
    share: float = setting(0.5, real_number(0.0, 1.0, open_interval=True))
    on: bool = setting(True, boolean())
    names: list[str] = setting(["a"], list_of(string(), min_items=1, unique=True), key="list")
    targets: list[str] = setting([], list_of(string()), recorded=False)


def test_defaults_fill_what_the_section_leaves_out():
    assert read_section(Toy, {"k": 3}, "toy") == Toy(k=3)
    assert read_section(Toy, None, "toy") == Toy()


def test_params_names_and_recorded_fields():
    toy = read_section(Toy, {"list": ["x", "y"], "targets": ["m"]}, "toy")
    assert toy.names == ["x", "y"] and toy.targets == ["m"]
    assert as_params(toy) == {"k": 10, "scope": "words", "share": 0.5, "on": True, "list": ["x", "y"]}


@pytest.mark.parametrize(
    "section, message",
    [
        ({"k": "ten"}, 'toy.k must be a whole number from 1 to 100, got "ten"'),
        ({"k": 0}, "toy.k must be a whole number from 1 to 100, got 0"),
        ({"k": 10**12}, "toy.k must be a whole number from 1 to 100, got 1000000000000"),
        ({"k": 2.0}, "toy.k must be a whole number from 1 to 100, got 2.0"),
        ({"k": True}, "toy.k must be a whole number from 1 to 100, got true"),
        ({"scope": "max"}, 'toy.scope must be one of words, all, got "max"'),
        ({"share": 1}, "toy.share must be a number between 0 and 1 (both excluded), got 1"),
        ({"share": float("nan")}, "toy.share must be a number between 0 and 1 (both excluded), got NaN"),
        ({"on": "yes"}, 'toy.on must be true or false, got "yes"'),
        ({"list": "abc"}, 'toy.list must be a list of 1 or more items, got "abc"'),
        ({"list": []}, "toy.list must be a list of 1 or more items, got []"),
        ({"list": ["a", 3]}, "toy.list[1] must be non-empty text, got 3"),
        ({"list": ["a", "a"]}, 'toy.list[1] repeats "a"; list each entry once'),
        ({"kk": 3}, "toy.kk is not a setting of toy (known: k, scope, share, on, list, targets); remove it or fix its spelling"),
    ],
)
def test_each_mistake_is_one_line_naming_the_param(section, message):
    with pytest.raises(DissectError) as error:
        read_section(Toy, section, "toy")
    assert str(error.value) == message


def test_a_section_that_is_not_a_mapping():
    with pytest.raises(DissectError, match="toy must be a mapping of settings, got \\[1\\]"):
        read_section(Toy, [1], "toy")


@given(st.integers())
def test_whole_number_accepts_exactly_its_range(value):
    rule = whole_number(1, 100)
    if 1 <= value <= 100:
        assert rule(value, "x") == value
    else:
        with pytest.raises(DissectError):
            rule(value, "x")
