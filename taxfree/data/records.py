"""The project's record kinds (JSONL, one object a line), their validation and conversions.

Every stage reads and writes these, so a bad record is caught here with `file:line` instead
of deep inside a trainer. The shapes follow TRL's dataset formats: a prompt or a completion is
either a string ("standard") or a list of chat messages ("conversational"), never a mix within
one record or one file.

Kinds (extra keys such as "id" or "source" are allowed and kept):
- text:   {"text": str}
- prompt: {"prompt": P}                                  prompts to sample from
- sft:    {"messages": [..., assistant]} or {"prompt": P, "completion": C}
- pref:   {"prompt": P, "chosen": C, "rejected": C}      chosen != rejected
- rw:     {"prompt": P, "completions": [C] * K, "rewards": [float] * K}   K >= 2, finite
- kto:    {"prompt": P, "completion": C, "label": bool}

P is a non-empty string or a non-empty message list; C is a string (may be empty) or a
non-empty message list ending with an assistant message, in the same format as P.
A pref record whose chosen equals its rejected is an error, not a warning: the pair carries no
preference (the DPO gradient is exactly zero) and almost always means a conversion bug.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from taxfree.atomic import atomic_write_bytes, atomic_write_text
from taxfree.errors import TaxfreeError

MESSAGE_ROLES = ("system", "user", "assistant", "tool")

# kind -> the fields it requires (sft also accepts prompt/completion instead of messages).
RECORD_KINDS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "prompt": ("prompt",),
    "sft": ("messages",),
    "pref": ("prompt", "chosen", "rejected"),
    "rw": ("prompt", "completions", "rewards"),
    "kto": ("prompt", "completion", "label"),
}

STANDARD = "standard"
CONVERSATIONAL = "conversational"


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "object", list: "list", str: "string", bool: "bool", int: "int", float: "float"}.get(
        type(value), type(value).__name__
    )


def _fail(where: str, message: str) -> TaxfreeError:
    return TaxfreeError(f"{where}: {message}" if where else message)


def _check_messages(value: Any, field: str, where: str) -> None:
    if not value:
        raise _fail(where, f"'{field}' is an empty message list")
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise _fail(where, f"'{field}[{i}]' must be a message object, got {_type_name(message)}")
        role, content = message.get("role"), message.get("content")
        if role not in MESSAGE_ROLES:
            raise _fail(where, f"'{field}[{i}].role' must be one of {', '.join(MESSAGE_ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise _fail(where, f"'{field}[{i}].content' must be a string, got {_type_name(content)}")


def _check_prompt(value: Any, field: str, where: str) -> str:
    """Validate a prompt and return its format (standard or conversational)."""
    if isinstance(value, str):
        if not value.strip():
            raise _fail(where, f"'{field}' is an empty string")
        return STANDARD
    if isinstance(value, list):
        _check_messages(value, field, where)
        return CONVERSATIONAL
    raise _fail(where, f"'{field}' must be a string or a list of messages, got {_type_name(value)}")


def _check_completion(value: Any, field: str, fmt: str, where: str) -> None:
    if fmt == STANDARD:
        if not isinstance(value, str):
            raise _fail(where, f"'{field}' must be a string like the prompt, got {_type_name(value)}")
        return
    if not isinstance(value, list):
        raise _fail(where, f"'{field}' must be a list of messages like the prompt, got {_type_name(value)}")
    _check_messages(value, field, where)
    if value[-1]["role"] != "assistant":
        raise _fail(where, f"'{field}' must end with an assistant message, got role {value[-1]['role']!r}")


def _require(obj: dict, kind: str, fields: Sequence[str], where: str) -> None:
    for field in fields:
        if field not in obj:
            raise _fail(where, f"{kind} record is missing '{field}'")


def validate_record(kind: str, obj: Any, where: str = "") -> None:
    """Raise TaxfreeError (prefixed with `where`, e.g. "file.jsonl:7") if `obj` is not a `kind` record."""
    if kind not in RECORD_KINDS:
        raise TaxfreeError(f"unknown record kind {kind!r} (choose from {', '.join(RECORD_KINDS)})")
    if not isinstance(obj, dict):
        raise _fail(where, f"a {kind} record must be a JSON object, got {_type_name(obj)}")

    if kind == "text":
        _require(obj, kind, ("text",), where)
        if not isinstance(obj["text"], str):
            raise _fail(where, f"'text' must be a string, got {_type_name(obj['text'])}")
        if not obj["text"].strip():
            raise _fail(where, "'text' is an empty string")
        return
    if kind == "prompt":
        _require(obj, kind, ("prompt",), where)
        _check_prompt(obj["prompt"], "prompt", where)
        return
    if kind == "sft":
        _validate_sft(obj, where)
        return

    _require(obj, kind, RECORD_KINDS[kind], where)
    fmt = _check_prompt(obj["prompt"], "prompt", where)
    if kind == "pref":
        _check_completion(obj["chosen"], "chosen", fmt, where)
        _check_completion(obj["rejected"], "rejected", fmt, where)
        if obj["chosen"] == obj["rejected"]:
            raise _fail(where, "'chosen' and 'rejected' are identical (a pair without a preference)")
    elif kind == "kto":
        _check_completion(obj["completion"], "completion", fmt, where)
        if not isinstance(obj["label"], bool):
            raise _fail(where, f"'label' must be true or false, got {_type_name(obj['label'])}")
    elif kind == "rw":
        completions, rewards = obj["completions"], obj["rewards"]
        if not isinstance(completions, list):
            raise _fail(where, f"'completions' must be a list, got {_type_name(completions)}")
        if not isinstance(rewards, list):
            raise _fail(where, f"'rewards' must be a list of numbers, got {_type_name(rewards)}")
        if len(completions) != len(rewards):
            raise _fail(where, f"'completions' has {len(completions)} entries but 'rewards' has {len(rewards)}")
        if len(completions) < 2:
            raise _fail(where, f"a rw record contrasts at least 2 completions, got {len(completions)}")
        for i, completion in enumerate(completions):
            _check_completion(completion, f"completions[{i}]", fmt, where)
        for i, reward in enumerate(rewards):
            if isinstance(reward, bool) or not isinstance(reward, (int, float)):
                raise _fail(where, f"'rewards[{i}]' must be a number, got {_type_name(reward)}")
            if not math.isfinite(reward):
                raise _fail(where, f"'rewards[{i}]' is not finite ({reward})")


def _validate_sft(obj: dict, where: str) -> None:
    has_messages = "messages" in obj
    has_pair = "prompt" in obj or "completion" in obj
    if has_messages and has_pair:
        raise _fail(where, "sft record has both 'messages' and 'prompt'/'completion' (use one form)")
    if has_messages:
        messages = obj["messages"]
        if not isinstance(messages, list):
            raise _fail(where, f"'messages' must be a list of messages, got {_type_name(messages)}")
        _check_messages(messages, "messages", where)
        if messages[-1]["role"] != "assistant":
            raise _fail(where, f"'messages' must end with an assistant message, got role {messages[-1]['role']!r}")
        return
    if not has_pair:
        raise _fail(where, "sft record needs 'messages' or 'prompt' and 'completion'")
    _require(obj, "sft", ("prompt", "completion"), where)
    fmt = _check_prompt(obj["prompt"], "prompt", where)
    _check_completion(obj["completion"], "completion", fmt, where)


def record_format(kind: str, obj: dict) -> str:
    """standard or conversational, for a record that already validated as `kind`."""
    if kind == "text":
        return STANDARD
    if kind == "sft" and "messages" in obj:
        return CONVERSATIONAL
    return CONVERSATIONAL if isinstance(obj["prompt"], list) else STANDARD


# ---------------------------------------------------------------------------------------------
# Files


def _open_binary(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def iter_jsonl(path: str | os.PathLike) -> Iterable[tuple[int, Any]]:
    """Yield (line number, parsed value) for every non-blank line; errors name `path:line`."""
    path = Path(path)
    if not path.is_file():
        raise TaxfreeError(f"{path}: no such file")
    with _open_binary(path) as f:
        lineno = 0
        while True:
            lineno += 1
            try:
                raw = f.readline()
            except (OSError, EOFError) as exc:
                raise TaxfreeError(f"{path}:{lineno}: unreadable ({exc})") from None
            if not raw:
                return
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                raise TaxfreeError(f"{path}:{lineno}: not valid UTF-8 ({exc.reason} at byte {exc.start + 1})") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                # "Unterminated string starting at" names where the string began: keep one "at".
                msg = exc.msg.removesuffix(" at")
                raise TaxfreeError(f"{path}:{lineno}: malformed JSON ({msg} at column {exc.colno})") from None


def read_jsonl(path: str | os.PathLike, kind: str | None = None) -> list[dict]:
    """Read a JSONL file of objects; with `kind`, validate each record and their common format.

    An empty file is an error: a stage silently training on nothing is worse than stopping.
    """
    if kind is not None and kind not in RECORD_KINDS:
        raise TaxfreeError(f"unknown record kind {kind!r} (choose from {', '.join(RECORD_KINDS)})")
    records: list[dict] = []
    first_format: tuple[str, int] | None = None
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if kind is None:
            if not isinstance(obj, dict):
                raise TaxfreeError(f"{where}: a record must be a JSON object, got {_type_name(obj)}")
        else:
            validate_record(kind, obj, where)
            fmt = record_format(kind, obj)
            if first_format is None:
                first_format = (fmt, lineno)
            elif fmt != first_format[0]:
                raise TaxfreeError(
                    f"{where}: {fmt} record in a file whose line {first_format[1]} is {first_format[0]} "
                    "(prompts must be all strings or all message lists)"
                )
        records.append(obj)
    if not records:
        raise TaxfreeError(f"{path}: no records (empty data set)")
    return records


def write_jsonl(path: str | os.PathLike, records: Iterable[dict], kind: str | None = None) -> int:
    """Write records atomically, one JSON object a line; with `kind`, validate them first. Returns the count."""
    lines = []
    for i, record in enumerate(records):
        if kind is not None:
            validate_record(kind, record, f"{path}: record {i + 1}")
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    data = "".join(lines)
    if str(path).endswith(".gz"):
        atomic_write_bytes(path, gzip.compress(data.encode("utf-8"), mtime=0))
    else:
        atomic_write_text(path, data)
    return len(lines)


# ---------------------------------------------------------------------------------------------
# Helpers and conversions between kinds


def as_messages(prompt_or_messages: str | list, role: str = "user") -> list[dict]:
    """A prompt or completion as a message list: a string becomes one message with `role`."""
    if isinstance(prompt_or_messages, str):
        return [{"role": role, "content": prompt_or_messages}]
    if isinstance(prompt_or_messages, list):
        _check_messages(prompt_or_messages, "messages", "")
        return [dict(m) for m in prompt_or_messages]
    raise TaxfreeError(f"expected a string or a list of messages, got {_type_name(prompt_or_messages)}")


def completion_text(completion: str | list) -> str:
    """The text of a completion: a string as is, a message list as its contents joined by blank lines."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        _check_messages(completion, "completion", "")
        return "\n\n".join(m["content"] for m in completion)
    raise TaxfreeError(f"expected a string or a list of messages, got {_type_name(completion)}")


def _extras(record: dict, fields: Iterable[str]) -> dict:
    drop = set(fields)
    return {k: v for k, v in record.items() if k not in drop}


def pref_to_sft(record: dict) -> dict:
    """SFT on the chosen response: {"prompt", "completion": chosen}."""
    extras = _extras(record, RECORD_KINDS["pref"])
    return {"prompt": record["prompt"], "completion": record["chosen"], **extras}


def pref_to_kto(record: dict) -> list[dict]:
    """A pair becomes two unpaired examples: chosen labelled True, rejected labelled False."""
    extras = _extras(record, RECORD_KINDS["pref"])
    return [
        {"prompt": record["prompt"], "completion": record["chosen"], "label": True, **extras},
        {"prompt": record["prompt"], "completion": record["rejected"], "label": False, **extras},
    ]


def pref_to_rw(record: dict, rewards: tuple[float, float] = (1.0, 0.0)) -> dict:
    """A pair as a K=2 reward-labelled record, chosen first (rewards 1 and 0 unless given)."""
    extras = _extras(record, RECORD_KINDS["pref"])
    return {
        "prompt": record["prompt"],
        "completions": [record["chosen"], record["rejected"]],
        "rewards": [float(rewards[0]), float(rewards[1])],
        **extras,
    }


def rw_to_pref(record: dict) -> dict | None:
    """Best versus worst completion (first of each on ties); None when they carry no preference
    (all rewards equal, or the best and worst texts are identical). A reward tie is never turned
    into a preference: the pairwise losses (taxfree.losses.contrastive) give a tied pair weight 0."""
    rewards = record["rewards"]
    best = max(range(len(rewards)), key=lambda i: (rewards[i], -i))
    worst = min(range(len(rewards)), key=lambda i: (rewards[i], i))
    chosen, rejected = record["completions"][best], record["completions"][worst]
    if rewards[best] == rewards[worst] or chosen == rejected:
        return None
    extras = _extras(record, RECORD_KINDS["rw"])
    return {"prompt": record["prompt"], "chosen": chosen, "rejected": rejected, **extras}


def sft_to_prompt_completion(record: dict) -> dict:
    """{"messages": [...]} -> {"prompt": all but the last message, "completion": [last]}."""
    if "messages" not in record:
        return dict(record)
    messages = record["messages"]
    if len(messages) < 2:
        raise TaxfreeError("an sft conversation needs a prompt message before the final assistant reply")
    extras = _extras(record, ("messages",))
    return {"prompt": [dict(m) for m in messages[:-1]], "completion": [dict(messages[-1])], **extras}


def prompt_key(record: dict) -> str:
    """A stable key for the prompt a record answers (for splitting without prompt leakage)."""
    if "prompt" in record:
        value = record["prompt"]
    elif "messages" in record:
        value = record["messages"][:-1]
    else:
        value = record.get("text", "")
    return json.dumps(value, sort_keys=True, ensure_ascii=False)
