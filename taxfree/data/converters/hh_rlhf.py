"""Anthropic HH-RLHF: "\\n\\nHuman: ...\\n\\nAssistant: ..." transcripts -> chat preference pairs.

Upstream (Anthropic/hh-rlhf, MIT licence): jsonl.gz files, one {"chosen": str, "rejected": str}
a line, two full transcripts that share every turn but the last assistant reply.
The prompt is every message before that reply; chosen and rejected are the two final replies.
Rows whose transcripts differ earlier, end without an assistant reply, have an empty final reply
or the same reply on both sides are skipped (and counted), as EXO's preprocessing also drops them.
"""

from __future__ import annotations

import re

from taxfree.data.converters._common import SkipRecord, field, pref_outputs

NAME = "hh_rlhf"
HUB_ID = "Anthropic/hh-rlhf"
HUB_CONFIG = None
HUB_SPLITS = {"train": "train", "test": "test"}

# A turn starts at a blank line followed by a speaker tag; "Humans:" occurs a few times upstream.
_TURN = re.compile(r"\n\n(Human|Humans|Assistant):")
_ROLE = {"Human": "user", "Humans": "user", "Assistant": "assistant"}


def parse_transcript(text: str) -> list[dict]:
    """Split an HH transcript into chat messages (content stripped of surrounding whitespace)."""
    parts = _TURN.split(text)
    if parts[0].strip():
        raise SkipRecord("transcript does not start with a Human turn")
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": _ROLE[speaker], "content": content.strip()})
    if not messages:
        raise SkipRecord("transcript has no turns")
    return messages


def convert(row: dict) -> dict[str, list[dict]]:
    chosen = parse_transcript(field(row, "chosen", str, NAME))
    rejected = parse_transcript(field(row, "rejected", str, NAME))
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise SkipRecord("transcript does not end with an Assistant reply")
    prompt = chosen[:-1]
    if not prompt:
        raise SkipRecord("transcript has no Human turn before the reply")
    if rejected[:-1] != prompt:
        raise SkipRecord("chosen and rejected transcripts differ before the final reply")
    if not chosen[-1]["content"] or not rejected[-1]["content"]:
        raise SkipRecord("empty final reply")
    if chosen[-1] == rejected[-1]:
        raise SkipRecord("chosen and rejected replies are identical")
    return pref_outputs({"prompt": prompt, "chosen": [chosen[-1]], "rejected": [rejected[-1]]})
