"""Responses of a causal LM to held-out prompts: the text the reward axis is measured on.

Batched with left padding (so every row's new tokens start at the same column), message prompts
rendered with the tokenizer's chat template and a generation prompt, greedy by default.
Sampling is seeded per batch from `seed`, so a rerun gives the same responses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from taxfree.errors import TaxfreeError


def _is_messages(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt)


def render_prompt(tokenizer, prompt) -> tuple[str, bool]:
    """(text, add_special_tokens): a chat template already holds its special tokens."""
    if isinstance(prompt, str):
        return prompt, True
    if _is_messages(prompt):
        if not getattr(tokenizer, "chat_template", None):
            raise TaxfreeError("generation: the prompts are chat messages but the tokenizer has no chat template")
        return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True), False
    raise TaxfreeError(f"generation: a prompt must be a string or a list of messages, got {type(prompt).__name__}")


@torch.no_grad()
def generate_responses(
    model,
    tokenizer,
    prompts: Sequence,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    desc: str = "generating",
) -> list[str]:
    """One response per prompt, in order, special tokens removed and surrounding space stripped."""
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    if batch_size < 1 or max_new_tokens < 1:
        raise TaxfreeError("generation: batch_size and max_new_tokens must be >= 1")
    if not prompts:
        return []
    rendered = [render_prompt(tokenizer, p) for p in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=top_p if do_sample else None,
        top_k=None,
        pad_token_id=pad_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    device = next(model.parameters()).device
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    gen = torch.Generator().manual_seed(seed)
    out: list[str] = []
    try:
        starts = range(0, len(rendered), batch_size)
        for s in tqdm(starts, desc=desc, disable=not progress, total=len(starts), unit="batch"):
            batch = rendered[s : s + batch_size]
            # One call per special-token convention, so a string prompt keeps its BOS.
            enc = tokenizer([t for t, _ in batch], return_tensors="pt", padding=True,
                            add_special_tokens=batch[0][1] and all(a for _, a in batch))
            batch_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
            if do_sample:
                torch.manual_seed(batch_seed)
            ids = model.generate(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                                 generation_config=gen_cfg)
            new = ids[:, enc["input_ids"].shape[1] :]
            out.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out
