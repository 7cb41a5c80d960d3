"""Chit-Chat Challenge conversations (BYU PCC lab, PyPI `chitchat-dataset`) -> preference pairs.

Upstream: one JSON object, conversation id -> {"prompt": starter question the two people were
given, "ratings": {"witty", "upbeat", "interesting"} (1-10, ints or digit strings, given to the
whole conversation), "start", "messages": [[{"text", "timestamp", "sender"}, ...], ...]} where
each inner list is one turn (consecutive utterances of one sender).

The ratings belong to whole conversations, so a pair can only compare two conversations that
answer the same starter. How a conversation becomes one response to its starter:
- prompt: the starter as a user message;
- response: the conversation's first turn of MIN_WORDS to MAX_WORDS words (utterances joined
  by spaces): short greetings ("hey whats up") are skipped, monologues are left out;
- rating: the mean of the three ratings.
Pairs: within one starter and one split, conversations rated >= HIGH (chosen) are matched with
ones rated <= LOW (rejected) in a seeded order, each conversation used once; so every pair has a
rating gap of at least HIGH - LOW. The mid ratings (5 is by far the most common, it looks like a
default) never make a pair. SFT examples are the HIGH responses; prompts are the distinct
starters (the same 30-odd questions serve sampling and the held-out reward evaluation, because
the reward model was trained on responses to them).
Splits are by conversation (seeded), so a held-out pair compares responses the reward model has
not seen, to starters it has.
"""

from __future__ import annotations

import random
import statistics

from taxfree.data.converters._common import SkipRecord, UpstreamSchemaError, field
from taxfree.data.records import pref_to_kto

NAME = "chitchat"
HUB_ID = None  # not on the hub: the PyPI package chitchat-dataset ships dataset.json
HUB_CONFIG = None
HUB_SPLITS: dict[str, str | None] = {}

MIN_WORDS, MAX_WORDS = 10, 60
HIGH, LOW = 8.0, 4.0
RATING_KEYS = ("witty", "upbeat", "interesting")


def rating(conv: dict) -> float:
    ratings = field(conv, "ratings", dict, NAME)
    values = []
    for key in RATING_KEYS:
        value = ratings.get(key)
        try:
            values.append(float(value))
        except (TypeError, ValueError):
            raise UpstreamSchemaError(f"{NAME}: rating {key!r} must be a number, got {value!r}") from None
    return statistics.fmean(values)


def first_response(conv: dict, min_words: int = MIN_WORDS, max_words: int = MAX_WORDS) -> str:
    messages = field(conv, "messages", list, NAME)
    for turn in messages:
        if not isinstance(turn, list):
            raise UpstreamSchemaError(f"{NAME}: a turn must be a list of utterances")
        text = " ".join(field(u, "text", str, NAME).strip() for u in turn).strip()
        if min_words <= len(text.split()) <= max_words:
            return " ".join(text.split())
    raise SkipRecord(f"no turn of {min_words}-{max_words} words")


def convert(row: dict) -> dict[str, list[dict]]:
    """One conversation -> a candidate {"prompt", "response", "rating"} (paired by `combine`)."""
    if "ratings" not in row:
        raise SkipRecord("conversation not rated")
    starter = field(row, "prompt", str, NAME, allow_none=True) if "prompt" in row else None
    if not starter or not starter.strip():  # some conversations had no starter question
        raise SkipRecord("no starter question")
    score = rating(row)  # a malformed rating is a wrong file, even in a conversation skipped below
    return {"candidate": [{"prompt": [{"role": "user", "content": starter.strip()}],
                           "response": first_response(row), "rating": score, "id": row.get("id")}]}


def combine(candidates: list[dict], seed: int = 0) -> dict[str, list[dict]]:
    """Candidates of one split -> pref, sft, kto and prompt records (see the module doc)."""
    by_starter: dict[str, list[dict]] = {}
    for c in candidates:
        by_starter.setdefault(c["prompt"][0]["content"], []).append(c)
    rng = random.Random(seed)
    pref, sft = [], []
    for starter in sorted(by_starter):
        group = by_starter[starter]
        high = [c for c in group if c["rating"] >= HIGH]
        low = [c for c in group if c["rating"] <= LOW]
        rng.shuffle(high)
        rng.shuffle(low)
        for c in high:
            sft.append({"prompt": c["prompt"], "completion": [{"role": "assistant", "content": c["response"]}],
                        "rating": c["rating"]})
        for w, l in zip(high, low):
            if w["response"] == l["response"]:
                continue
            pref.append({"prompt": w["prompt"], "chosen": [{"role": "assistant", "content": w["response"]}],
                         "rejected": [{"role": "assistant", "content": l["response"]}],
                         "chosen_rating": w["rating"], "rejected_rating": l["rating"]})
    kto = [r for p in pref for r in pref_to_kto(p)]
    prompts = [{"prompt": [{"role": "user", "content": s}]} for s in sorted(by_starter)]
    return {"pref": pref, "sft": sft, "kto": kto, "prompt": prompts}
