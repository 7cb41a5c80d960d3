"""Shared pieces of the upstream converters: skipping quirky rows, checking upstream schemas."""

from __future__ import annotations

from typing import Any

from taxfree.data.records import pref_to_kto, pref_to_rw, pref_to_sft
from taxfree.errors import TaxfreeError


class SkipRecord(Exception):
    """An upstream row that is well-formed but unusable (ties, empty replies, ...).

    Raised by a converter with a short reason; `convert_rows` counts reasons instead of failing,
    because every large public data set has a few such rows.
    """


class UpstreamSchemaError(TaxfreeError):
    """An upstream row does not have the upstream schema: the file is not what the source expects."""


def field(row: Any, key: str, types: type | tuple[type, ...], source: str, allow_none: bool = False) -> Any:
    """row[key], checked against the upstream schema (a wrong file is an error, not a skip)."""
    if not isinstance(row, dict):
        raise UpstreamSchemaError(f"{source}: expected an object, got {type(row).__name__}")
    if key not in row:
        raise UpstreamSchemaError(f"{source}: missing key '{key}' (is this a {source} file?)")
    value = row[key]
    if value is None and allow_none:
        return None
    allowed = types if isinstance(types, tuple) else (types,)
    # bool is an int subclass in Python, but a bool where upstream has a number is a wrong file
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        expected = " or ".join(t.__name__ for t in allowed)
        got = "null" if value is None else type(value).__name__
        raise UpstreamSchemaError(f"{source}: '{key}' must be {expected}, got {got}")
    return value


def pref_outputs(pref: dict, rewards: tuple[float, float] = (1.0, 0.0)) -> dict[str, list[dict]]:
    """Everything a preference pair feeds: pref, sft (chosen), kto (both sides), rw (K=2)."""
    return {
        "pref": [pref],
        "sft": [pref_to_sft(pref)],
        "kto": pref_to_kto(pref),
        "rw": [pref_to_rw(pref, rewards)],
    }
