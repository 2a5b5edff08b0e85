"""docs/config.md is generated from the structured configs (rlloop/config_docs.py) and kept up to date."""

from __future__ import annotations

from dataclasses import dataclass

from rlloop import config_docs
from rlloop.config import Config


def test_the_config_reference_is_up_to_date():
    want = config_docs.render()
    have = config_docs.DOC.read_text()
    assert have == want, "docs/config.md is out of date: run `python -m rlloop.config_docs` and commit the result"


@dataclass
class _Example:
    # a comment above the field
    plain: int = 1  # and one at its end
    path: str = "x"  # a folder from somewhere; None = the policy +
    # a continuation of path's comment
    # (two lines of it)
    after: bool = False
    bare: float = 0.5


def test_field_comments_are_read_from_the_source():
    comments = config_docs._field_comments(_Example)
    assert comments == {
        "plain": "a comment above the field — and one at its end",
        "path": "a folder from somewhere; None = the policy + a continuation of path's comment (two lines of it)",
        "after": "",
        "bare": "",
    }


def test_every_schema_key_is_in_the_reference():
    import dataclasses
    import typing

    def keys(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from keys(hints[f.name], f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"

    text = config_docs.DOC.read_text()
    missing = [k for k in keys(Config) if f"| `{k}` |" not in text]
    assert not missing, missing
