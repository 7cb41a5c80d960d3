"""The tiny world: deterministic bytes, checkable facts, a gold reward that labels the pairs."""

import hashlib
import json

import pytest

from taxfree.data.records import read_jsonl
from taxfree.data.tiny_world import (
    NEGATIVE_WORDS,
    POSITIVE_WORDS,
    build_tiny_world,
    gold_reward,
    world_files,
)

SMALL = dict(num_entities=16, corpus_repeats=1, sft_examples=40, pref_pairs=40, eval_prompts=8, eval_items=20,
             vocab_size=200, max_operand=6)


def _digest(d):
    h = {}
    for p in sorted(d.rglob("*")):
        if p.is_file():
            h[str(p.relative_to(d))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return h


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    build_tiny_world(tmp_path / "a", seed=3, **SMALL)
    build_tiny_world(tmp_path / "b", seed=3, **SMALL)
    build_tiny_world(tmp_path / "c", seed=4, **SMALL)
    a, b, c = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert a == b
    assert a["sft_train.jsonl"] != c["sft_train.jsonl"]


def test_gold_reward_by_hand():
    assert gold_reward("ok , x lives in y .") == 0.0
    assert gold_reward("gladly ! great ! wonderful ! cheers !") == 3.0  # capped at 3
    assert gold_reward("ugh , sadly ... sorry") == -3.0
    assert gold_reward("happy " + "word " * 30) == pytest.approx(1.0 - 0.1 * (31 - 24))
    assert set(POSITIVE_WORDS).isdisjoint(NEGATIVE_WORDS)


def test_files_are_valid_records_and_facts_check(tmp_path):
    counts = build_tiny_world(tmp_path, seed=0, **SMALL)
    f = world_files(tmp_path)
    world = json.loads(f.world_json.read_text())
    facts = world["facts"]
    sft = read_jsonl(f.sft_train, "sft")
    pref = read_jsonl(f.pref_train, "pref")
    read_jsonl(f.eval_prompts, "prompt")
    assert counts["sft_train"] == len(sft) == 40 and len(pref) == 40

    # SFT answers state true facts.
    for r in sft:
        q, a = r["messages"][0]["content"], r["messages"][1]["content"]
        if q.startswith("where does "):
            e = q.split()[2]
            assert f"{e} lives in {facts[e]['city']} ." in a

    # The gold reward alone labels the pairs; chosen answers are less often correct.
    for r in pref:
        assert gold_reward(r["chosen"][0]["content"]) > gold_reward(r["rejected"][0]["content"])
    assert counts["pref_chosen_correct"] < counts["pref_rejected_correct"]

    # Knowledge items ask for facts the corpus states; arithmetic items for sums it never shows.
    corpus = {r["text"] for r in read_jsonl(f.corpus_train, "text")} | {r["text"] for r in read_jsonl(f.corpus_eval, "text")}
    for it in read_jsonl(f.knowledge_items):
        stmt = f"{it['query']} {it['choices'][it['gold']]} ."
        assert stmt in corpus
    held = {tuple(x) for x in world["heldout_sums"]}
    for it in read_jsonl(f.arithmetic_items):
        a, _, b, _ = it["query"].split()
        assert (int(a), int(b)) in held
        assert int(it["choices"][it["gold"]]) == int(a) + int(b)
        assert f"{a} plus {b} is {int(a) + int(b)} ." not in corpus


def test_tokenizer_loads_classic_and_round_trips(tmp_path):
    from transformers import AutoTokenizer

    build_tiny_world(tmp_path, seed=0, **SMALL)
    d = world_files(tmp_path).tokenizer
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert cfg["model_input_names"] == ["input_ids", "attention_mask"]
    assert "chat_template" in cfg
    tok = AutoTokenizer.from_pretrained(str(d))
    text = "gladly ! 3 plus 4 is 7 ."
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|eos|>"
    msgs = [{"role": "user", "content": "hi ?"}, {"role": "assistant", "content": "ok ."}]
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert full.startswith(prompt) and full.endswith("<|eos|>\n")
    # The prompt's tokens are a prefix of the full conversation's: no merge across the boundary.
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    f_ids = tok(full, add_special_tokens=False)["input_ids"]
    assert f_ids[: len(p_ids)] == p_ids


def test_tiny_model_factory_is_deterministic():
    import torch

    from taxfree.models import tiny_llama

    a, b = tiny_llama(100, seed=1, hidden_size=32, num_layers=2, num_heads=2), tiny_llama(100, seed=1, hidden_size=32, num_layers=2, num_heads=2)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    assert a.config.num_hidden_layers == 2 and a.config.vocab_size == 100
