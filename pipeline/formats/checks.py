"""What a model file says is checked before it is used: the paths it names and its JSON.

A file from anywhere may name other files (a safetensors index its shards) and may hold
JSON built to hurt the parser. :func:`file_inside` is the one gate for a path that comes
from a model folder or from inside a model file: it must resolve to a file inside the
folder. :func:`parse_json` refuses duplicate keys (as the safetensors library does) and
nesting deeper than :data:`MAX_JSON_DEPTH`, checked by a cheap scan before parsing.
Messages quote values read from a file only through :func:`quoted`, which bounds them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import DissectError

MAX_JSON_DEPTH = 64  # a safetensors header, index.json or params.json nests 3 levels deep
# Values parsed cost ~100 bytes each: this keeps a header within ~200 MB (a real one holds
# ~6 a tensor: 330,000 tensors).
MAX_JSON_ITEMS = 2_000_000
MAX_JSON_FILE_BYTES = 64 * 1024 * 1024  # an index.json or params.json takes kilobytes


class JSONProblem(ValueError):
    """JSON that parses badly or is built to hurt the parser; the message says which."""


def quoted(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: a value read from a file, fit for a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_whole(value: Any) -> bool:
    """A JSON or metadata integer: ``True`` and ``4.0`` are not."""
    return type(value) is int


def file_inside(folder: Path, name: str | Path, described: str, fix: str) -> Path:
    """``folder / name``, when that is a file whose real path lies inside ``folder``.

    ``name`` comes from a folder listing or from inside a model file; absolute names, ``..``
    and links that lead out of ``folder`` are refused, and so is anything but a file. Only
    metadata is looked at (never the bytes), and nothing outside ``folder`` is touched when
    the name alone shows it is outside.
    """
    folder = Path(folder)
    relative = Path(name)
    candidate = folder / relative
    outside = DissectError(
        f"{described} {quoted(str(name))} lies outside {folder}; a model's files must be inside its folder: {fix}"
    )
    if not str(name) or relative.is_absolute() or ".." in relative.parts:
        raise outside if str(name) else DissectError(f"{described} is an empty name; {fix}")
    try:
        real, root = candidate.resolve(), folder.resolve()
        inside = real == root or real.is_relative_to(root)
        is_file = inside and real.is_file()
    except (OSError, RuntimeError, ValueError):  # a loop of links, a NUL in the name
        raise DissectError(f"{described} {quoted(str(name))} is not a usable file name; {fix}") from None
    if not inside:
        raise outside
    if not is_file:
        missing = not candidate.exists() and not candidate.is_symlink()
        raise DissectError(f"{described} {quoted(str(name))} {'is missing from' if missing else 'is not a file in'} {folder}; {fix}")
    return candidate


# ---- JSON ------------------------------------------------------------------------------------

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # brackets inside strings do not nest
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # open: +1, close: -1 (as int8)
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


def _json_shape(raw: bytes) -> tuple[int, int]:
    """(nesting depth, a bound on the values) of the JSON ``raw``: brackets and commas outside strings."""
    outside_strings = _STRING.sub(b"", raw)
    steps = outside_strings.translate(_STEPS, _NOT_BRACKETS)  # +1/-1 per bracket
    opens = steps.count(1)
    items = opens + outside_strings.count(b",")  # every value but a container's first follows a comma
    if opens <= MAX_JSON_DEPTH:
        return opens, items  # cannot nest deeper than it opens
    values = np.frombuffer(steps, dtype=np.int8)
    depth = peak = 0
    for start in range(0, len(values), 1 << 20):  # running depth, a MiB of brackets at a time
        running = np.cumsum(values[start : start + (1 << 20)], dtype=np.int64) + depth
        peak, depth = max(peak, int(running.max())), int(running[-1])
    return peak, items


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise JSONProblem(f"the key {quoted(twice)} appears twice")
    return result


def parse_json(raw: bytes) -> Any:
    """The UTF-8 JSON ``raw``; :class:`JSONProblem` for bad JSON, duplicate keys or deep nesting."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise JSONProblem("not UTF-8 text") from None
    depth, items = _json_shape(raw)
    if depth > MAX_JSON_DEPTH:
        raise JSONProblem(f"nested deeper than {MAX_JSON_DEPTH} levels")
    if items > MAX_JSON_ITEMS:
        raise JSONProblem(f"more than {MAX_JSON_ITEMS:,} values")
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except JSONProblem:
        raise
    except RecursionError:  # the scan above keeps this from happening; kept as a last guard
        raise JSONProblem(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as error:
        raise JSONProblem(f"not valid JSON: {error}") from None


def read_json_file(path: Path, limit: int = MAX_JSON_FILE_BYTES) -> Any:
    """:func:`parse_json` of a small file (an index, params.json), refusing one over ``limit`` bytes unread."""
    with open(path, "rb") as handle:
        raw = handle.read(limit + 1)
    if len(raw) > limit:
        raise JSONProblem(f"larger than the {limit:,}-byte limit for such a file")
    return parse_json(raw)
