"""Tokenisation and batching for ContrastiveTrainer: K completions of a prompt in one forward.

Records come in the project's `rw` format {"prompt", "completions": [K], "rewards": [K]} or its
`pref` format {"prompt", "chosen", "rejected"} (read as K = 2 with rewards (1, 0)). Prompts and
completions are plain strings or lists of chat messages, as in TRL's dataset formats.

Tokens are made the way TRL's DPOTrainer makes them, so that a method run by TRL and one run by
us see the same tokens for the same record: text completions get the EOS appended and are
tokenised together with the prompt; chat records are rendered with the chat template (prompt
with the generation prompt; prompt + completion as a whole conversation); the completion starts
where all K prompt+completion token lists stop sharing their prefix with the prompt's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from taxfree.errors import TaxfreeError
from taxfree.losses.logprobs import IGNORE_INDEX

RW_COLUMNS = ("prompt", "completions", "rewards")
PREF_COLUMNS = ("prompt", "chosen", "rejected")
TOKENIZED_COLUMNS = ("prompt_ids", "completion_ids", "rewards")


def record_format(column_names: Sequence[str]) -> str:
    """'rw' or 'pref' from a dataset's columns; TaxfreeError for anything else."""
    names = set(column_names)
    if names.issuperset(RW_COLUMNS):
        return "rw"
    if names.issuperset(PREF_COLUMNS):
        return "pref"
    raise TaxfreeError(
        f"dataset columns {sorted(names)} are neither the rw format {list(RW_COLUMNS)} "
        f"nor the pref format {list(PREF_COLUMNS)}"
    )


def check_tokenizer(tokenizer: Any) -> None:
    """The collator pads with pad_token_id and text completions end with the EOS: both must exist."""
    if tokenizer is None:
        raise TaxfreeError("ContrastiveTrainer needs processing_class (a tokenizer)")
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise TaxfreeError("tokenizer has no eos token: completions need one to end")
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise TaxfreeError("tokenizer has no pad token (set tokenizer.pad_token = tokenizer.eos_token)")


def _is_chat(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)


def _chat_ids(tokenizer: Any, messages: list, add_generation_prompt: bool) -> list[int]:
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )
    return list(encoded["input_ids"])


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_prompt_completions(
    tokenizer: Any,
    prompt: str | list,
    completions: Sequence[str | list],
    max_length: int | None = None,
    max_prompt_length: int | None = None,
) -> tuple[list[int], list[list[int]]]:
    """(prompt_ids, [completion_ids] * K) with truncation: the prompt loses its start, completions their end."""
    if _is_chat(prompt):
        prompt_ids = _chat_ids(tokenizer, prompt, add_generation_prompt=True)
        fulls = []
        for c in completions:
            turn = c if _is_chat(c) else [{"role": "assistant", "content": c}]
            fulls.append(_chat_ids(tokenizer, list(prompt) + list(turn), add_generation_prompt=False))
    elif isinstance(prompt, str):
        eos = tokenizer.eos_token
        prompt_ids = list(tokenizer(prompt)["input_ids"])
        fulls = []
        for c in completions:
            if not isinstance(c, str):
                raise TaxfreeError("a text prompt needs text completions, got a message list")
            text = c if c.endswith(eos) else c + eos
            fulls.append(list(tokenizer(prompt + text)["input_ids"]))
    else:
        raise TaxfreeError(f"prompt must be a string or a list of chat messages, got {type(prompt).__name__}")

    start = min(_common_prefix(prompt_ids, full) for full in fulls)
    prompt_ids = prompt_ids[:start]
    completion_ids = [full[start:] for full in fulls]
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[len(prompt_ids) - max_prompt_length :]
    if max_length is not None:
        room = max(max_length - len(prompt_ids), 0)
        completion_ids = [ids[:room] for ids in completion_ids]
    return prompt_ids, completion_ids


@dataclass
class RecordTokenizer:
    """The `datasets.map` function: one record in, prompt_ids / completion_ids [K] / rewards [K] out.

    `exact` (K was not asked for, so it was read from record 0): every record must hold K
    completions. Otherwise records may hold more, and the first K are used.
    """

    tokenizer: Any
    fmt: str
    num_completions: int
    exact: bool
    max_length: int | None = None
    max_prompt_length: int | None = None

    def __call__(self, record: dict, index: int) -> dict:
        k = self.num_completions
        if self.fmt == "pref":
            completions, rewards = [record["chosen"], record["rejected"]], [1.0, 0.0]
        else:
            completions, rewards = list(record["completions"]), list(record["rewards"])
            if len(rewards) != len(completions):
                raise TaxfreeError(f"record {index}: {len(completions)} completions but {len(rewards)} rewards")
            if self.exact and len(completions) != k:
                raise TaxfreeError(
                    f"record {index} holds {len(completions)} completions, record 0 holds {k}: every record "
                    "needs the same K (or set num_completions to use the first K of each)"
                )
            if len(completions) < k:
                raise TaxfreeError(f"record {index}: {len(completions)} completions, fewer than the K = {k} asked for")
            completions, rewards = completions[:k], rewards[:k]
        for r in rewards:
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
                raise TaxfreeError(f"record {index}: rewards must be finite numbers, got {r!r}")
        prompt_ids, completion_ids = tokenize_prompt_completions(
            self.tokenizer, record["prompt"], completions, self.max_length, self.max_prompt_length
        )
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "rewards": [float(r) for r in rewards]}


def tokenize_dataset(
    dataset: Any,
    tokenizer: Any,
    num_completions: int | None = None,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    pairwise: bool = False,
) -> Any:
    """A datasets.Dataset of rw/pref records -> one with prompt_ids, completion_ids [K], rewards [K].

    K is `num_completions`, else 2 for pref records, else the count of record 0 (then every record
    must match). `pairwise` losses need K = 2.
    """
    check_tokenizer(tokenizer)
    fmt = record_format(dataset.column_names)
    if len(dataset) == 0:
        raise TaxfreeError("dataset is empty")
    if fmt == "pref":
        if num_completions not in (None, 2):
            raise TaxfreeError(f"pref records hold 2 completions, not the K = {num_completions} asked for")
        k, exact = 2, True
    elif num_completions is not None:
        k, exact = num_completions, False
    else:
        k, exact = len(dataset[0]["completions"]), True
    if k < 2:
        raise TaxfreeError(f"each record needs at least 2 completions to compare, got K = {k}")
    if pairwise and k != 2:
        raise TaxfreeError(f"this loss compares pairs, so K must be 2; got K = {k} (set num_completions=2)")
    fn = RecordTokenizer(tokenizer, fmt, k, exact, max_length, max_prompt_length)
    return dataset.map(fn, with_indices=True, remove_columns=dataset.column_names, desc="tokenizing")


@dataclass
class ContrastiveCollator:
    """Pads all B*K prompt+completion sequences of a batch on the right into one tensor.

    Row b*K + k is completion k of prompt b. `labels` are the input ids on completion tokens and
    -100 on prompt and padding, so a log-ratio sums over response tokens only.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ks = {len(f["completion_ids"]) for f in features}
        if len(ks) != 1:
            raise TaxfreeError(f"a batch mixes records with different numbers of completions: {sorted(ks)}")
        rows = [(list(f["prompt_ids"]), list(c)) for f in features for c in f["completion_ids"]]
        length = max(len(p) + len(c) for p, c in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        for i, (p, c) in enumerate(rows):
            n_p, n = len(p), len(p) + len(c)
            input_ids[i, :n] = torch.tensor(p + c, dtype=torch.long)
            attention_mask[i, :n] = 1
            labels[i, n_p:n] = input_ids[i, n_p:n]
        rewards = torch.tensor([list(f["rewards"]) for f in features], dtype=torch.float32)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "rewards": rewards}
