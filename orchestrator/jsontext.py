"""Reading the JSON files we write ourselves (state, records, cursors, run records), tolerantly:
a file may be damaged (a crash, a full disk, a hand edit) or written by another version.

`parse_object` says what is wrong in one exception type; `object_or_none` is for the readers that
fall back to a default (a cursor: a damaged one costs a re-read, not the collection);
`known_fields` keeps a record's keys its dataclass knows, so that a newer version may add fields.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, fields
from typing import Any


class JsonObjectError(ValueError):
    """The text is not a JSON object, or lacks a required field."""


def parse_object(text: str | bytes) -> dict[str, Any]:
    """The JSON object in `text`; JsonObjectError if it is not JSON or not an object."""
    try:
        value = json.loads(text)
    except ValueError as error:  # JSONDecodeError, and bytes that are not UTF-8
        raise JsonObjectError(f"not JSON ({error})") from None
    if not isinstance(value, dict):
        raise JsonObjectError(f"a JSON {type(value).__name__}, not an object")
    return value


def object_or_none(text: str | bytes) -> dict[str, Any] | None:
    try:
        return parse_object(text)
    except JsonObjectError:
        return None


def known_fields(cls: type[Any], value: dict[str, Any]) -> dict[str, Any]:
    """The keys of `value` that are fields of dataclass `cls` (others dropped: a newer version
    may add fields); JsonObjectError naming any required field that is missing."""
    missing = {
        f.name
        for f in fields(cls)
        if f.default is MISSING and f.default_factory is MISSING and f.name not in value
    }
    if missing:
        raise JsonObjectError(f"no {', '.join(sorted(missing))}")
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in value.items() if k in names}
