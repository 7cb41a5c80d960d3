"""rm, sample and align stages on the tiny world: what each produces, checked."""

import copy
import json

import pytest
import torch

from conftest import TINY_EXPERIMENT, write_config
from taxfree.data.records import completion_text, read_jsonl
from taxfree.data.tiny_world import gold_reward
from taxfree.pipeline.config import load_config
from taxfree.pipeline.manifest import MANIFEST, read_manifest
from taxfree.pipeline.runner import Runner

pytestmark = pytest.mark.slow


def _experiment(tmp_path, **sections):
    data = copy.deepcopy(TINY_EXPERIMENT)
    data["run_dir"] = str(tmp_path / "runs")
    # 1024 pairs: with fewer the reward model scores the SFT model's own samples barely better than
    # chance against the gold reward (correlation ~0.05-0.2 at 256-512 pairs, ~0.45-0.6 at 1024),
    # and exo-rw, which learns only from those scores, then learns the RM's quirks instead.
    data["world"]["tiny"].update(pref_pairs=1024, eval_prompts=24, sft_examples=256)
    # Enough pretraining and SFT that answers are sentences whose style alignment can change; six SFT
    # epochs make the sampled answers clean enough (fewer misspelt words) for the RM to judge.
    data["pretrain"].update(epochs=12, lr=8e-3)
    data["pretrain"]["model"].update(hidden_size=64, num_heads=4, intermediate_size=128)
    data["sft"].update(epochs=6, lr=3e-3, max_length=64)
    data["rm"] = {"epochs": 3, "lr": 3e-3, "batch_size": 32, "max_length": 128, "save_steps": 1000, "logging_steps": 5}
    # 48 new tokens hold a whole answer (the longest SFT answer is ~47 tokens): the RM scores
    # complete responses, as it was trained on, not cut-off ones.
    data["sample"] = {"num_completions": 4, "max_new_tokens": 48, "max_prompts": 84, "chunk_size": 28, "batch_size": 16}
    data["align"] = {"methods": ["dpo"], "optimizers": ["adamw"], "epochs": 1, "lr": 1e-3, "batch_size": 16,
                     "max_length": 128, "max_prompt_length": 48, "save_steps": 1000, "logging_steps": 5, "beta": 0.1,
                     "beta_pi": 0.5, "beta_r": 1.0}
    for k, v in sections.items():
        data[k].update(v)
    return write_config(tmp_path, data)


@pytest.fixture(scope="module")
def upto_rm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("align")
    path = _experiment(tmp)
    Runner(load_config(path)).run(["world", "pretrain", "sft", "rm"])
    return tmp, path, tmp / "runs" / "t"


def test_rm_is_well_above_chance(upto_rm):
    _, _, root = upto_rm
    m = read_manifest(root / "rm")["metrics"]
    assert m["eval_pairs"] == 102  # max(64, pref_pairs // 10) held-out pairs
    assert m["eval_pairwise_accuracy"] >= 0.7, m
    assert m["eval_pairwise_accuracy"] > m["eval_pairwise_accuracy_before"] + 0.1


def test_sample_scores_and_resumes_without_resampling(upto_rm):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from taxfree.eval.reward import score_with_reward_model

    tmp, path, root = upto_rm
    cfg = load_config(path)
    Runner(cfg).run(["sample"])
    rw = read_jsonl(root / "sample" / "rw.jsonl", "rw")
    assert len(rw) == 84 and all(len(r["completions"]) == 4 for r in rw)
    # The stored rewards are the reward model's scores of those completions.
    rm = AutoModelForSequenceClassification.from_pretrained(str(root / "rm" / "model")).eval()
    tok = AutoTokenizer.from_pretrained(str(root / "rm" / "model"))
    r0 = rw[0]
    again = score_with_reward_model(rm, tok, [r0["prompt"]] * 4, [completion_text(c) for c in r0["completions"]], progress=False)
    assert again == pytest.approx(r0["rewards"], abs=1e-4)
    # Collected = best-of-K by reward.
    collected = read_jsonl(root / "sample" / "collected.jsonl", "sft")
    for r, c in zip(rw, collected):
        best = max(range(4), key=r["rewards"].__getitem__)
        assert c["messages"][-1]["content"] == completion_text(r["completions"][best])

    # Kill-and-resume: manifest gone and the last chunk lost; earlier chunks are not sampled again.
    chunks = sorted((root / "sample" / "chunks").iterdir())
    assert len(chunks) == 3
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in chunks}
    key = read_manifest(root / "sample")["key"]
    (root / "sample" / MANIFEST).unlink()
    (root / "sample" / ".started.json").write_text(json.dumps({"key": key}))
    chunks[-1].unlink()
    Runner(load_config(path)).run(["sample"])
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted((root / "sample" / "chunks").iterdir())}
    assert after[chunks[0].name] == before[chunks[0].name]
    assert after[chunks[1].name] == before[chunks[1].name]
    assert after[chunks[-1].name][1] == before[chunks[-1].name][1]  # same seed per chunk: same samples
    assert read_jsonl(root / "sample" / "rw.jsonl", "rw") == rw


def _mean_gold(model_dir, prompts):
    """Mean gold reward of greedy answers (as the evaluate stage makes them) to the held-out prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=48, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
    responses = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(gold_reward(r) for r in responses) / len(responses)


def _pearson(xs, ys):
    xs, ys = torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    xs, ys = xs - xs.mean(), ys - ys.mean()
    return float((xs * ys).sum() / (xs.norm() * ys.norm()))


# Both variants train for the same steps (DPO on the pairs, exo-rw on 84 prompts x 4 samples).
ALIGN_STEPS = "align.max_steps=30"


def test_dpo_and_exo_rw_raise_gold_reward_and_variants_are_kept(upto_rm):
    tmp, path, root = upto_rm
    cfg = load_config(path, ["align.methods=[dpo, exo-rw]", ALIGN_STEPS])
    Runner(cfg).run(["sample", "align"])
    # exo-rw learns only from the RM's scores of the SFT model's samples: they must track the gold
    # reward (measured 0.46 here; 0.55 and 0.59 with seeds 1 and 2).
    rw = read_jsonl(root / "sample" / "rw.jsonl", "rw")
    rewards = [x for r in rw for x in r["rewards"]]
    gold_of_samples = [gold_reward(completion_text(c)) for r in rw for c in r["completions"]]
    assert _pearson(rewards, gold_of_samples) > 0.3
    prompts = [r["prompt"] for r in read_jsonl(root / "world" / "data" / "eval_prompts.jsonl")]
    gold = {v: _mean_gold(root / v / "model", prompts) for v in ("sft", "align/dpo-adamw", "align/exo-rw-adamw")}
    for variant in ("dpo-adamw", "exo-rw-adamw"):
        m = read_manifest(root / "align" / variant)
        assert m["variant"] == variant
        metrics = m["metrics"]
        assert metrics["steps"] == 30
        assert metrics["train_loss"] > 0 and "eval_rewards/accuracies" in metrics
    # Both learn the world's taste: DPO from the labelled pairs, exo-rw from the reward model's
    # scores of its own samples (measured: sft -0.04, dpo 0.92, exo-rw 0.96; the gold reward of an
    # answer is an integer, so +0.3 is a cheerful opener on a third of the prompts).
    assert gold["align/dpo-adamw"] >= gold["sft"] + 0.3, gold
    assert gold["align/exo-rw-adamw"] >= gold["sft"] + 0.3, gold
    assert "eval_logratio/chosen" in read_manifest(root / "align" / "dpo-adamw")["metrics"]
    assert "eval_logratios/mean" in read_manifest(root / "align" / "exo-rw-adamw")["metrics"]
    # Adding a method trains only that one; dropping one removes its directory.
    first = read_manifest(root / "align" / "dpo-adamw")["run_id"]
    Runner(load_config(path, ["align.methods=[dpo, ipo]", ALIGN_STEPS])).run(["align"])
    assert read_manifest(root / "align" / "dpo-adamw")["run_id"] == first
    assert (root / "align" / "ipo-adamw" / "model" / "config.json").is_file()
    assert not (root / "align" / "exo-rw-adamw").exists()


def test_every_method_trains(upto_rm):
    tmp, path, root = upto_rm
    methods = ["hinge", "exo-pair", "kto", "kto-pair", "exo-pref", "dpo-pref", "dpo-rw"]
    cfg = load_config(path, [f"align.methods=[{', '.join(methods)}]", "align.max_steps=3"])
    Runner(cfg).run(["sample", "align"])
    for m in methods:
        man = read_manifest(root / "align" / f"{m}-adamw")
        assert man["metrics"]["steps"] == 3, m
        assert man["metrics"]["train_loss"] == man["metrics"]["train_loss"], m  # not NaN
        assert (root / "align" / f"{m}-adamw" / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("optimizer", ["ondare", "onties"])
def test_online_merging_optimizers_in_the_align_stage(upto_rm, optimizer):
    """tau = SFT - base comes from the run. OnDARE with q = 1 and no merge is AdamW, so the result
    must equal the adamw variant's; OnTIES still elects signs against tau, so it must differ."""
    tmp, path, root = upto_rm
    sets = ["align.methods=[dpo]", "align.max_steps=4", "align.optimizer.reserve_p=1.0", "align.optimizer.alpha=0.0",
            "align.optimizer.use_merge=false", f"align.optimizers=[adamw, {optimizer}]"]
    Runner(load_config(path, sets)).run(["align"])
    from safetensors.torch import load_file

    a = load_file(str(root / "align" / "dpo-adamw" / "model" / "model.safetensors"))
    b = load_file(str(root / "align" / f"dpo-{optimizer}" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    same = all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert same == (optimizer == "ondare")
    man = read_manifest(root / "align" / f"dpo-{optimizer}")
    assert man["inputs"]["base"]["stage"] == "pretrain"
    # And with merging on, the result differs (tau is used).
    sets2 = sets[:-1] + ["align.optimizer.reserve_p=0.5", "align.optimizer.alpha=0.5", "align.optimizer.use_merge=true",
                         f"align.optimizers=[{optimizer}]"]
    Runner(load_config(path, sets2)).run(["align"])
    c = load_file(str(root / "align" / f"dpo-{optimizer}" / "model" / "model.safetensors"))
    assert any(not torch.allclose(a[k], c[k], atol=1e-4) for k in a)


def _sentiment_classifier(root, out):
    """A two-label classifier (NEGATIVE, POSITIVE) on the run's tokenizer: EXO-IMDB's reward shape."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(str(root / "rm" / "model"))
    torch.manual_seed(3)
    clf = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                                     num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"},
                                                     label2id={"NEGATIVE": 0, "POSITIVE": 1},
                                                     pad_token_id=tok.pad_token_id))
    clf.save_pretrained(out)
    tok.save_pretrained(out)
    return clf.eval(), tok


def test_sample_and_evaluate_score_with_a_classifier_label(upto_rm, tmp_path):
    """sample.reward_model + reward_label: the rewards are the named class's logit of a classifier
    (EXO on IMDB), not the run's rm; the rm stage is not needed at all."""
    from taxfree.data.tiny_world import world_files
    from taxfree.eval.reward import score_with_reward_model

    _, _, root = upto_rm
    clf, tok = _sentiment_classifier(root, tmp_path / "clf")
    files = world_files(root / "world" / "data")
    data = {"name": "clf", "run_dir": str(tmp_path / "runs"), "stages": ["sample", "evaluate"],
            "world": {"kind": "none"},
            "models": {"base": str(root / "pretrain" / "model"), "sft": str(root / "sft" / "model")},
            "data": {"pref_train": str(files.pref_train), "eval_prompts": str(files.eval_prompts)},
            "sample": {"num_completions": 2, "max_new_tokens": 16, "max_prompts": 6, "chunk_size": 6,
                       "reward_model": str(tmp_path / "clf"), "reward_label": "positive"},
            "evaluate": {"reward_model": str(tmp_path / "clf"), "reward_label": "1", "max_prompts": 4,
                         "max_new_tokens": 8, "benchmarks": []}}
    path = tmp_path / "clf.yaml"
    path.write_text(json.dumps(data))
    Runner(load_config(path)).run()
    out = tmp_path / "runs" / "clf"
    rw = read_jsonl(out / "sample" / "rw.jsonl", "rw")
    assert len(rw) == 6
    prompts = [r["prompt"] for r in rw for _ in r["completions"]]
    texts = [completion_text(c) for r in rw for c in r["completions"]]
    expected = score_with_reward_model(clf, tok, prompts, texts, progress=False, label=1)
    assert [x for r in rw for x in r["rewards"]] == pytest.approx(expected, abs=1e-5)
    negative = score_with_reward_model(clf, tok, prompts, texts, progress=False, label=0)
    assert negative != pytest.approx(expected, abs=1e-3)  # the label picks a column that matters
    results = json.loads((out / "evaluate" / "sft" / "results.json").read_text())
    responses = [json.loads(line)["response"] for line in (out / "evaluate" / "sft" / "responses.jsonl").read_text().splitlines()]
    eval_prompts = [r["prompt"] for r in read_jsonl(files.eval_prompts, "prompt")][:4]
    assert results["result"]["reward"] == pytest.approx(
        sum(score_with_reward_model(clf, tok, eval_prompts, responses, progress=False, label=1)) / 4, abs=1e-5)


def test_pairs_from_samples_take_the_first_two_completions():
    from taxfree.stages.align import pairs_from_samples

    records = [
        {"prompt": "a", "completions": ["x", "y", "z"], "rewards": [0.1, 0.9, 5.0]},  # z is not in the K = 2 draw
        {"prompt": "b", "completions": ["u", "v"], "rewards": [0.3, 0.3]},  # a tie: no preference
        {"prompt": "c", "completions": ["w", "w"], "rewards": [1.0, 0.0]},  # same text: none either
        {"prompt": "d", "completions": ["p", "q", "r"], "rewards": [2.0, -1.0, 0.0]},
    ]
    assert pairs_from_samples(records) == [{"prompt": "a", "chosen": "y", "rejected": "x"},
                                           {"prompt": "d", "chosen": "p", "rejected": "q"}]


def test_pairwise_methods_can_train_on_pairs_from_samples(upto_rm):
    """align.pref_pairs: samples (EXO on IMDB, which has no human pairs): dpo trains on the
    sample stage's reward-labelled pairs, not on data.pref_train."""
    from taxfree.stages.align import pairs_from_samples

    tmp, path, root = upto_rm
    cfg = load_config(path, ["align.methods=[exo-pref]", "align.max_steps=2", "align.pref_pairs=samples"])
    assert "sample" in cfg.enabled_stages()
    Runner(cfg).run(["sample", "align"])
    expected = pairs_from_samples(read_jsonl(root / "sample" / "rw.jsonl", "rw"))
    m = read_manifest(root / "align" / "exo-pref-adamw")
    assert m["metrics"]["train_examples"] == len(expected) > 0
    assert len(expected) != len(read_jsonl(root / "world" / "data" / "pref_train.jsonl", "pref"))
    assert m["config"]["align"]["pref_pairs"] == "samples"
