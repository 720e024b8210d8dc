"""The one tolerant reader of our own JSON files."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from orchestrator.jsontext import JsonObjectError, known_fields, object_or_none, parse_object


@dataclass
class Rec:
    id: str
    n: int = 0


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "not JSON"),
        ("{", "not JSON"),
        ("[1]", "list, not an object"),
        ("7", "int"),
        (b"\xff\xfe", "not JSON"),
    ],
)
def test_what_is_not_an_object_is_said(text: str | bytes, why: str) -> None:
    with pytest.raises(JsonObjectError, match=why):
        parse_object(text)
    assert object_or_none(text) is None


def test_known_fields_keeps_ours_drops_newer_and_names_the_missing() -> None:
    assert known_fields(Rec, parse_object('{"id": "a", "later": 1}')) == {"id": "a"}
    with pytest.raises(JsonObjectError, match="no id"):
        known_fields(Rec, {"n": 3})
    assert object_or_none('{"id": "x"}') == {"id": "x"}
