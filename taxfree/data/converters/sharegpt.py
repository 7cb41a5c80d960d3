"""ShareGPT-style conversations -> SFT chats.

Upstream schema (used by ShareGPT dumps, SlimOrca, OpenHermes, ...): {"id"?: str,
"conversations": [{"from": "system"|"human"|"gpt"|..., "value": str, ...}, ...]}.
The download takes Open-Orca/SlimOrca-Dedup (MIT licence, ~363k GPT-4 answered FLAN prompts,
one train split; the test split is drawn with --test-fraction). Speakers map to chat roles
(human/user -> user, gpt/assistant/chatgpt/bard/bing/model -> assistant, system -> system);
trailing turns after the last assistant reply are dropped. Conversations with an unknown
speaker, an empty turn or no assistant reply are skipped. "id" is kept when present.
"""

from __future__ import annotations

from taxfree.data.converters._common import SkipRecord, field

NAME = "sharegpt"
HUB_ID = "Open-Orca/SlimOrca-Dedup"
HUB_CONFIG = None
HUB_SPLITS = {"train": None}  # one upstream split; None = split it with test_fraction

ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
}


def convert(row: dict) -> dict[str, list[dict]]:
    turns = field(row, "conversations", list, NAME)
    messages = []
    for i, turn in enumerate(turns):
        speaker = field(turn, "from", str, f"{NAME} conversations[{i}]")
        value = field(turn, "value", str, f"{NAME} conversations[{i}]")
        if speaker.lower() not in ROLES:
            raise SkipRecord(f"unknown speaker {speaker!r}")
        if not value.strip():
            raise SkipRecord("empty turn")
        messages.append({"role": ROLES[speaker.lower()], "content": value})
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()
    if not any(m["role"] == "user" for m in messages):
        raise SkipRecord("no user turn before an assistant reply")
    record = {"messages": messages}
    if isinstance(row.get("id"), (str, int)):
        record["id"] = row["id"]
    return {"sft": [record]}
