"""Reading a judge's verdict out of its reply, strictly.

The published prompts ask for `[[rating]]` (single-answer grading, e.g. `Rating: [[7]]`) or
`[[A]]` / `[[B]]` / `[[C]]` (pairwise, C a tie). A reply counts only when it states exactly one
verdict in that form: no bare `[7]`, no rating outside 1-10, no reply naming two different
verdicts. Anything else is unparseable (the caller asks again, then records a failure).
"""

from __future__ import annotations

import re

_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_CHOICE = re.compile(r"\[\[([ABC])\]\]")
RATING_RANGE = (1.0, 10.0)


def parse_rating(reply: str | None) -> float | None:
    """The 1-10 rating in `[[n]]`, or None when there is none, two differ, or it is out of range."""
    values = {float(v) for v in _RATING.findall(reply or "")}
    if len(values) != 1:
        return None
    (value,) = values
    return value if RATING_RANGE[0] <= value <= RATING_RANGE[1] else None


def parse_choice(reply: str | None) -> str | None:
    """"A", "B" or "tie" from `[[A]]` / `[[B]]` / `[[C]]`, or None when absent or contradictory."""
    choices = set(_CHOICE.findall(reply or ""))
    if len(choices) != 1:
        return None
    (choice,) = choices
    return "tie" if choice == "C" else choice
