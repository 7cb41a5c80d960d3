"""The evaluated model's answers to the judge benchmarks, generated once and cached.

`generate_answers` is the single place where the judge calls the project's generation path: a
conversation (chat messages) in, greedy text out, through the tokenizer's chat template. The
answers are kept in an append-only store keyed by the model's identity, the conversation and the
decoding settings, written every few batches, so a killed evaluate does not generate them again.
"""

from __future__ import annotations

from collections.abc import Sequence

from taxfree.eval.judge.store import JsonlStore, cache_key


def generate_answers(model, tokenizer, conversations: Sequence[list[dict]], max_new_tokens: int, batch_size: int,
                     desc: str) -> list[str]:
    """Greedy answers to chat conversations (the tokenizer's chat template, a generation prompt)."""
    from taxfree.eval.generation import generate_responses

    return generate_responses(model, tokenizer, list(conversations), max_new_tokens=max_new_tokens,
                              batch_size=batch_size, do_sample=False, desc=desc)


def answer_key(identity, conversation: list[dict], max_new_tokens: int) -> str:
    return cache_key({"model": identity, "conversation": conversation, "max_new_tokens": max_new_tokens,
                      "decoding": "greedy"})


def cached_answers(store: JsonlStore, model, tokenizer, identity, conversations: Sequence[list[dict]],
                   max_new_tokens: int, batch_size: int, desc: str) -> list[str]:
    """An answer per conversation: from the store, or generated (and stored) in chunks of batches."""
    keys = [answer_key(identity, c, max_new_tokens) for c in conversations]
    todo = [i for i, k in enumerate(keys) if k not in store]
    chunk = max(1, 4 * batch_size)
    for start in range(0, len(todo), chunk):
        part = todo[start : start + chunk]
        texts = generate_answers(model, tokenizer, [conversations[i] for i in part], max_new_tokens, batch_size,
                                 f"{desc} ({start + len(part)}/{len(todo)})")
        for i, text in zip(part, texts):
            store.add({"key": keys[i], "answer": text})
    return [store.get(k)["answer"] for k in keys]
