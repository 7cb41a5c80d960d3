"""A declared setting: name, default, type, help and the values it accepts, written once.

Optimizers declare their hyperparameters and alignment methods the settings they read as
`Param`s; the YAML config sections, their validation, the factories and the help texts are all
derived from those declarations (taxfree.optim.registry, taxfree.losses.methods).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

_INTERVAL = re.compile(r"^([\[(])\s*(-?[\d.e+-]+|-inf)\s*,\s*(-?[\d.e+-]+|inf)\s*([\])])$")
_BOUND = re.compile(r"^(>=|>|<=|<)\s*(-?[\d.e+-]+)$")


@dataclass(frozen=True)
class Param:
    """One setting. `within` is an interval such as "(0, 1]" or a bound such as ">= 1"; `check`
    returns why a value is wrong (or None) for rules an interval cannot say; `convert` turns the
    YAML value into what the code takes (e.g. a dtype name into a torch.dtype)."""

    name: str
    default: Any
    type: Any
    help: str
    within: str | None = None
    check: Callable[[Any], str | None] | None = None
    convert: Callable[[Any], Any] | None = None

    def __post_init__(self):
        if self.within is not None and not (_INTERVAL.match(self.within) or _BOUND.match(self.within)):
            raise ValueError(f"Param {self.name}: cannot read within={self.within!r}")

    def problem(self, value) -> str | None:
        """Why `value` is not acceptable, or None. None always passes where the type allows it."""
        if value is None:
            return None
        if self.within is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            why = _outside(value, self.within)
            if why:
                return why
        return self.check(value) if self.check is not None else None

    def value(self, raw):
        """What the code gets for the config value `raw`."""
        return self.convert(raw) if self.convert is not None and raw is not None else raw


def _outside(value: float, within: str) -> str | None:
    m = _BOUND.match(within)
    if m:
        op, bound = m.group(1), float(m.group(2))
        ok = {">=": value >= bound, ">": value > bound, "<=": value <= bound, "<": value < bound}[op]
        return None if ok else f"must be {within}"
    lo_kind, lo, hi, hi_kind = _INTERVAL.match(within).groups()
    lo, hi = float(lo), float(hi)
    ok = not math.isnan(value)
    ok = ok and (value >= lo if lo_kind == "[" else value > lo)
    ok = ok and (value <= hi if hi_kind == "]" else value < hi)
    return None if ok else f"{value} is outside {within}"


def merge_params(groups: list[tuple[str, tuple[Param, ...]]]) -> dict[str, Param]:
    """The union of several owners' params by name; one name must mean one thing everywhere
    (checked here, so two declarations cannot silently disagree on a default or a range)."""
    out: dict[str, Param] = {}
    owner: dict[str, str] = {}
    for who, params in groups:
        for p in params:
            if p.name in out and out[p.name] != p:
                raise TypeError(f"setting {p.name!r} is declared differently by {owner[p.name]} and {who}")
            out.setdefault(p.name, p)
            owner.setdefault(p.name, who)
    return out
