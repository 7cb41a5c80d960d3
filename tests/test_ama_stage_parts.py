"""AMA's batches (labels on responses only) and its resumable training loop."""

import pytest
import torch

from helpers_tokenizer import char_tokenizer
from taxfree.errors import TaxfreeError
from taxfree.merging.ama import AdaptiveModelAverager
from taxfree.merging.ama_data import lm_batches
from taxfree.merging.ama_training import train_ama
from test_ama import pair, VOCAB


def test_lm_batches_mask_prompt_and_padding():
    tok = char_tokenizer()
    records = [
        {"messages": [{"role": "user", "content": "what colour is the sky"}, {"role": "assistant", "content": "blue"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there, friend"}]},
    ]
    (batch,) = lm_batches(records, tok, batch_size=2, max_length=64, shuffle=False)
    for row, r in enumerate(records):
        prompt_ids = tok.apply_chat_template(r["messages"][:1], tokenize=True, add_generation_prompt=True,
                                             return_dict=True)["input_ids"]
        full_ids = tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"]
        n, p = len(full_ids), len(prompt_ids)
        assert batch["input_ids"][row, :n].tolist() == list(full_ids)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        labels = batch["labels"][row].tolist()
        assert labels[:p] == [-100] * p  # the prompt is not learned
        assert labels[p:n] == list(full_ids[p:])  # the response is
        assert all(x == -100 for x in labels[n:])  # nor is the padding
    with pytest.raises(TaxfreeError, match="no training records"):
        lm_batches([], tok, 2, 64)


def _batches():
    sft, aligned = pair(layers=4)
    prompt = torch.randint(0, VOCAB, (4, 3), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ids = aligned.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    labels = ids.clone()
    labels[:, :3] = -100
    return sft, aligned, [{"input_ids": ids[i:i + 2], "attention_mask": torch.ones_like(ids[i:i + 2]),
                           "labels": labels[i:i + 2]} for i in (0, 2)] * 4


def test_train_ama_resumes_to_the_same_logits(tmp_path):
    sft, aligned, batches = _batches()
    whole = AdaptiveModelAverager(sft, aligned, blocks="block4", reg=1e-3)
    full = train_ama(whole, batches, lr=0.3, warmup_ratio=0.2, progress=False)

    class Killed(Exception):
        pass

    def die_at_5(step, values):
        if step == 5:
            raise Killed

    state = tmp_path / "ama_state.safetensors"
    first = AdaptiveModelAverager(sft, aligned, blocks="block4", reg=1e-3)
    with pytest.raises(Killed):
        train_ama(first, batches, lr=0.3, warmup_ratio=0.2, progress=False, state_path=state, save_steps=2, log_fn=die_at_5)
    assert state.is_file()
    again = AdaptiveModelAverager(sft, aligned, blocks="block4", reg=1e-3)  # a new process: fresh logits
    resumed = train_ama(again, batches, lr=0.3, warmup_ratio=0.2, progress=False, state_path=state, save_steps=2)
    assert resumed["resumed_from"] == 4 and resumed["steps"] == full["steps"] == 8
    assert torch.equal(torch.stack(list(again.block_logits)), torch.stack(list(whole.block_logits)))  # bitwise
    assert resumed["losses"] == pytest.approx(full["losses"], abs=0)
