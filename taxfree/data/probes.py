"""General-ability probes: small multiple-choice benchmarks written offline, for runs without the hub.

The alignment tax is a drop in abilities the model had before alignment. On a machine that can
reach the hub, lm-eval's public tasks measure it (`evaluate.benchmarks: [arc_easy, piqa, ...]`).
The smol preset runs offline, so it measures the same kind of thing on items made here:
world knowledge (capitals), arithmetic, ordered sequences (days, months, numbers) and word
opposites, each a multiple-choice task for `evaluate.local_tasks` (loglikelihood of each choice
after the query, as lm-eval scores ARC or PIQA). A 135M model gets most capitals and sequences
right and some sums, so each task has room to fall. These are a proxy, not a published benchmark;
the items are deterministic (a seed fixes the distractors and their order).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from taxfree.atomic import atomic_dir

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens",
    "Canada": "Ottawa", "Australia": "Canberra", "Brazil": "Brasilia", "Argentina": "Buenos Aires",
    "Mexico": "Mexico City", "India": "New Delhi", "Kenya": "Nairobi", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Austria": "Vienna", "Ireland": "Dublin",
    "Turkey": "Ankara", "Thailand": "Bangkok", "Peru": "Lima", "Chile": "Santiago", "Cuba": "Havana",
    "Hungary": "Budapest", "Belgium": "Brussels", "the Netherlands": "Amsterdam", "Switzerland": "Bern",
    "South Korea": "Seoul", "Vietnam": "Hanoi", "Indonesia": "Jakarta", "Iran": "Tehran", "Iraq": "Baghdad",
    "Ukraine": "Kyiv", "Czechia": "Prague", "Colombia": "Bogota", "Morocco": "Rabat", "Nigeria": "Abuja",
    "Ethiopia": "Addis Ababa", "Philippines": "Manila", "Saudi Arabia": "Riyadh", "New Zealand": "Wellington",
    "Iceland": "Reykjavik", "Romania": "Bucharest", "Scotland": "Edinburgh",
}

OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "up": "down", "early": "late", "light": "dark",
    "open": "closed", "full": "empty", "strong": "weak", "rich": "poor", "young": "old", "wet": "dry",
    "loud": "quiet", "hard": "soft", "high": "low", "long": "short", "thick": "thin", "clean": "dirty",
    "true": "false", "win": "lose", "buy": "sell", "push": "pull", "begin": "end", "inside": "outside",
    "above": "below", "love": "hate", "friend": "enemy", "day": "night", "north": "south", "east": "west",
    "left": "right", "heavy": "light", "safe": "dangerous", "easy": "difficult", "cheap": "expensive",
    "remember": "forget", "arrive": "leave", "laugh": "cry", "accept": "refuse",
}

SEQUENCES = {
    "days": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "months": ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
               "November", "December"],
    "numbers": ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"],
    "letters": list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
}

TASKS = ("probe_capitals", "probe_arithmetic", "probe_sequences", "probe_opposites")


def _mc(query: str, gold: str, distractors: list[str], rng: random.Random) -> dict:
    choices = [gold] + distractors
    rng.shuffle(choices)
    return {"query": query, "choices": choices, "gold": choices.index(gold)}


def capitals(rng: random.Random) -> list[dict]:
    cities = sorted(set(CAPITALS.values()))
    return [_mc(f"Question: What is the capital of {country}?\nAnswer:", city,
                rng.sample([c for c in cities if c != city], 3), rng)
            for country, city in CAPITALS.items()]


def arithmetic(rng: random.Random, n: int = 60) -> list[dict]:
    items = []
    for _ in range(n):
        a, b = rng.randint(2, 49), rng.randint(2, 49)
        total = a + b
        wrong = sorted({total + d for d in (-10, -2, -1, 1, 2, 10)} - {total})
        items.append(_mc(f"Question: What is {a} plus {b}?\nAnswer:", str(total), [str(w) for w in rng.sample(wrong, 3)], rng))
    return items


def sequences(rng: random.Random) -> list[dict]:
    items = []
    for values in SEQUENCES.values():
        for i in range(len(values) - 3):
            shown, gold = values[i:i + 3], values[i + 3]
            others = [v for v in values if v not in shown and v != gold]
            items.append(_mc("Continue the list: " + ", ".join(shown) + ",", gold, rng.sample(others, 3), rng))
    return items


def opposites(rng: random.Random) -> list[dict]:
    words = sorted(set(OPPOSITES.values()) | set(OPPOSITES))
    antonyms: dict[str, set[str]] = {}
    for a, b in OPPOSITES.items():  # both directions: "light" is the opposite of "dark" and of "heavy"
        antonyms.setdefault(a, set()).add(b)
        antonyms.setdefault(b, set()).add(a)
    return [_mc(f"The opposite of \"{word}\" is", f"\"{gold}\"",
                [f"\"{w}\"" for w in rng.sample([w for w in words if w != word and w not in antonyms[word]], 3)], rng)
            for word, gold in OPPOSITES.items()]


def write_probes(out_dir: str | os.PathLike, seed: int = 0, overwrite: bool = False) -> dict[str, int]:
    """Write <out_dir>/<task>.jsonl for every task of TASKS; returns {task: items}."""
    rng = random.Random(seed)
    made = {"probe_capitals": capitals(rng), "probe_arithmetic": arithmetic(rng),
            "probe_sequences": sequences(rng), "probe_opposites": opposites(rng)}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for name, items in made.items():
            (Path(tmp) / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
    return {name: len(items) for name, items in made.items()}
