"""AMA's training batches from SFT-format records (the sample stage's best-of-K "collected" data).

Each record `{"messages": [..., {"role": "assistant", "content": ...}]}` (or prompt/completion)
becomes prompt + response tokens, tokenised as the alignment trainers tokenise them (chat
template, EOS after text completions), with labels -100 on the prompt and on padding: the NLL
counts only the response, the aligned policy's own behaviour that AMA should keep.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import torch

from taxfree.errors import TaxfreeError
from taxfree.losses.logprobs import IGNORE_INDEX


def prompt_and_response(record: dict) -> tuple[Any, Any]:
    if "messages" in record:
        msgs = record["messages"]
        if not msgs or msgs[-1].get("role") != "assistant":
            raise TaxfreeError("an AMA training record must end with an assistant message")
        return msgs[:-1], msgs[-1]["content"]
    return record["prompt"], record["completion"]


def lm_batches(records: Sequence[dict], tokenizer, batch_size: int, max_length: int, seed: int = 0,
               shuffle: bool = True) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of input_ids / attention_mask / labels (-100 on prompt and padding)."""
    from taxfree.trainers.data import check_tokenizer, tokenize_prompt_completions

    check_tokenizer(tokenizer)
    if not records:
        raise TaxfreeError("AMA: no training records")
    examples = []
    for i, r in enumerate(records):
        prompt, response = prompt_and_response(r)
        prompt_ids, (response_ids,) = tokenize_prompt_completions(tokenizer, prompt, [response], max_length=max_length)
        if not response_ids:
            continue  # the prompt alone fills max_length: nothing to learn from this record
        examples.append((prompt_ids + response_ids, len(prompt_ids)))
    if not examples:
        raise TaxfreeError(f"AMA: every record's prompt fills max_length={max_length}: raise max_length")
    if shuffle:
        random.Random(seed).shuffle(examples)
    pad = tokenizer.pad_token_id
    batches = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        for row, (ids, n_prompt) in enumerate(chunk):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention[row, :len(ids)] = 1
            labels[row, n_prompt:len(ids)] = torch.tensor(ids[n_prompt:])
        batches.append({"input_ids": input_ids, "attention_mask": attention, "labels": labels})
    return batches
