"""merge and ama stages on the tiny world, then evaluate and report over every model they made."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_EXPERIMENT, write_config
from taxfree.cli import main
from taxfree.pipeline.config import load_config
from taxfree.pipeline.manifest import read_manifest
from taxfree.pipeline.runner import Runner

pytestmark = pytest.mark.slow


def _state(model_dir):
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _layer(name):
    return int(name.split(".")[2]) if name.startswith("model.layers.") else None


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("merge_ama")
    data = copy.deepcopy(TINY_EXPERIMENT)
    data["run_dir"] = str(tmp / "runs")
    data["rm"] = {"epochs": 1, "lr": 3e-3, "batch_size": 16, "max_length": 96, "save_steps": 1000, "logging_steps": 5}
    data["sample"] = {"num_completions": 2, "max_new_tokens": 12, "max_prompts": 24, "chunk_size": 24, "batch_size": 24}
    data["align"] = {"methods": ["dpo"], "optimizers": ["adamw"], "max_steps": 4, "lr": 2e-3, "batch_size": 8,
                     "max_length": 96, "max_prompt_length": 48, "save_steps": 1000, "logging_steps": 2}
    data["merge"] = {"aligned_weights": [0.25, 0.5],
                     "partwise": [{"name": "pw", "blocks": "0:0.9,1-:0.1", "embed_weight": 0.3, "head_weight": 0.6}]}
    data["ama"] = {"blocks": "block3", "lr": 0.2, "batch_size": 8, "max_length": 64, "save_steps": 1}
    data["evaluate"] = {"max_new_tokens": 8, "batch_size": 8, "benchmark_batch_size": 16}
    path = write_config(tmp, data)
    Runner(load_config(path)).run()  # every stage, in order
    return tmp, path, data, tmp / "runs" / "t"


def test_merge_points_are_the_torch_arithmetic(run):
    _, _, _, root = run
    sft = _state(root / "sft" / "model")
    aligned = _state(root / "align" / "dpo-adamw" / "model")
    assert sorted(p.name for p in (root / "merge").iterdir() if (p / "stage.json").is_file()) == \
        ["dpo-adamw-pw", "dpo-adamw-w0.25", "dpo-adamw-w0.5"]
    for w in (0.25, 0.5):
        point = root / "merge" / f"dpo-adamw-w{w:g}"
        m = read_manifest(point)
        assert m["config"]["aligned"] == "dpo-adamw" and m["config"]["aligned_weight"] == w
        merged = _state(point / "model")
        assert set(merged) == set(sft)
        for name, t in merged.items():
            torch.testing.assert_close(t, (1 - w) * sft[name] + w * aligned[name], rtol=0, atol=1e-6)
        assert (point / "model" / "tokenizer.json").is_file()
    # Partwise: layer 0 at 0.9, layers 1.. at 0.1, embeddings 0.3, final norm and head 0.6.
    pw = _state(root / "merge" / "dpo-adamw-pw" / "model")
    for name, t in pw.items():
        layer = _layer(name)
        w = 0.9 if layer == 0 else 0.1 if layer is not None else 0.3 if "embed_tokens" in name else 0.6
        torch.testing.assert_close(t, (1 - w) * sft[name] + w * aligned[name], rtol=0, atol=1e-6, msg=name)
    m = read_manifest(root / "merge" / "dpo-adamw-pw")
    assert m["config"]["mode"] == "partwise" and m["config"]["aligned_weight"] is None


def test_adding_a_weight_merges_only_that_point(run):
    tmp, _, data, root = run
    before = {p: read_manifest(root / "merge" / p)["run_id"] for p in ("dpo-adamw-w0.25", "dpo-adamw-w0.5")}
    data = copy.deepcopy(data)
    data["merge"]["aligned_weights"] = [0.25, 0.5, 0.75]
    path = write_config(tmp, data, name="more.yaml")
    Runner(load_config(path)).run(["merge"])
    for p, run_id in before.items():
        assert read_manifest(root / "merge" / p)["run_id"] == run_id  # not merged again
    assert read_manifest(root / "merge" / "dpo-adamw-w0.75")["config"]["aligned_weight"] == 0.75
    # Back to the original list: the extra point is removed again.
    Runner(load_config(run[1])).run(["merge"])
    assert not (root / "merge" / "dpo-adamw-w0.75").exists()


def test_ama_writes_block_weights_and_the_merged_model(run):
    _, _, _, root = run
    vdir = root / "ama" / "dpo-adamw"
    m = read_manifest(vdir)
    assert m["config"]["aligned"] == "dpo-adamw"
    record = json.loads((vdir / "ama_weights.json").read_text())
    assert record == json.loads((vdir / "model" / "ama_weights.json").read_text())
    blocks = record["blocks"]
    assert [b["layers"] for b in blocks] == [[0], [1], [2]]  # block3 on the 3-layer tiny model
    assert sum(b["sft_weight"] for b in blocks) / 3 == pytest.approx(0.2, abs=1e-6)  # the mean stays s0
    assert len({round(b["aligned_weight"], 6) for b in blocks}) == 3  # training moved the blocks apart
    assert m["metrics"]["steps"] >= 3 and m["metrics"]["resumed_from_step"] == 0
    assert not (vdir / "ama_state.safetensors").exists()
    # The exported model: every layer tensor at its block's aligned weight, the rest at 1 - s0.
    sft = _state(root / "sft" / "model")
    aligned = _state(root / "align" / "dpo-adamw" / "model")
    merged = _state(vdir / "model")
    for name, t in merged.items():
        layer = _layer(name)
        w = blocks[layer]["aligned_weight"] if layer is not None else 0.8
        torch.testing.assert_close(t, (1 - w) * sft[name] + w * aligned[name], rtol=0, atol=1e-6, msg=name)
    assert any(p.name.startswith("events") for p in (vdir / "tb").iterdir())


def test_evaluate_and_report_include_merges_and_ama(run):
    _, _, _, root = run
    res = json.loads((root / "evaluate" / "results.json").read_text())
    rows = {r["id"]: r for r in res["models"]}
    assert list(rows) == ["sft", "align/dpo-adamw", "merge/dpo-adamw-pw", "merge/dpo-adamw-w0.25",
                          "merge/dpo-adamw-w0.5", "ama/dpo-adamw"]
    assert rows["merge/dpo-adamw-w0.25"]["aligned"] == "dpo-adamw"
    assert rows["merge/dpo-adamw-w0.25"]["aligned_weight"] == 0.25
    assert rows["merge/dpo-adamw-pw"]["merge_mode"] == "partwise" and rows["merge/dpo-adamw-pw"]["aligned_weight"] is None
    assert rows["ama/dpo-adamw"]["kind"] == "ama" and rows["ama/dpo-adamw"]["aligned"] == "dpo-adamw"
    md = (root / "report.md").read_text()
    for mid in rows:
        assert f"`{mid}`" in md
    assert (root / "pareto.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("section,value,why", [
    ("merge", {"aligned_weights": [1.5]}, "merge.aligned_weights: 1.5 is outside [0, 1]"),
    ("merge", {"aligned": ["dpo-adamv"]}, "merge.aligned: 'dpo-adamv' is not an align variant of this config (did you mean dpo-adamw?)"),
    ("merge", {"partwise": [{"blocks": "0-x:0.3"}]}, "merge.partwise[0].blocks: cannot read '0-x:0.3'"),
    ("merge", {"partwise": [{"blocks": "0-:0.3"}]}, "merge.partwise[0].embed_weight: required when aligned_weight is null"),
    ("ama", {"blocks": "thirds"}, "ama.blocks: 'thirds': expected block3, blockN"),
    ("ama", {"sft_mean": 1.2}, "ama.sft_mean: must be in (0, 1)"),
    ("ama", {"data": "missing.jsonl"}, "ama.data: file not found: missing.jsonl"),
])
def test_bad_merge_and_ama_settings_are_one_line(tmp_path, capsys, section, value, why):
    data = copy.deepcopy(TINY_EXPERIMENT)
    data["run_dir"] = str(tmp_path / "runs")
    data[section] = value
    path = write_config(tmp_path, data)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and why in err and "\n" not in err, err
    assert not (tmp_path / "runs").exists()


def test_ama_can_learn_on_the_aligned_models_own_best_of_k(run, tmp_path):
    """ama.collect_from: aligned (the paper): each variant samples its aligned model with the
    sample settings, keeps the best by reward, and trains on that, not on sample/collected.jsonl."""
    from taxfree.data.records import completion_text, read_jsonl
    from taxfree.eval.reward import score_with_reward_model
    from taxfree.models.load import load_causal_lm, load_tokenizer
    from taxfree.stages.sample import chunk_seed, generate, needs_samples
    from transformers import AutoModelForSequenceClassification

    tmp, _, data, root = run
    data = copy.deepcopy(data)
    data["ama"]["collect_from"] = "aligned"
    data["sample"]["max_prompts"] = 6
    path = write_config(tmp, data, name="ama_aligned.yaml")
    cfg = load_config(path)
    assert not needs_samples(cfg)  # dpo only: no stage needs the sample stage's samples any more
    Runner(cfg).run(["ama"])
    vdir = root / "ama" / "dpo-adamw"
    samples = read_jsonl(vdir / "samples.jsonl", "rw")
    collected = read_jsonl(vdir / "collected.jsonl", "sft")
    assert len(samples) == len(collected) == 6 and all(len(r["completions"]) == 2 for r in samples)
    for r, c in zip(samples, collected):  # best of K by reward
        best = max(range(2), key=r["rewards"].__getitem__)
        assert c["messages"][-1]["content"] == completion_text(r["completions"][best])
    # The samples are the aligned model's (same seed, same draws), not the SFT model's.
    tok = load_tokenizer(str(root / "world" / "data" / "tokenizer"))
    prompts = [r["prompt"] for r in samples]
    aligned = load_causal_lm(str(root / "align" / "dpo-adamw" / "model")).eval()
    again = generate(aligned, tok, prompts, 2, 0.8, 1.0, 12, 24, chunk_seed(cfg.seed, 0))
    assert [[completion_text(c) for c in r["completions"]] for r in samples] == again
    sft = load_causal_lm(str(root / "sft" / "model")).eval()
    assert generate(sft, tok, prompts, 2, 0.8, 1.0, 12, 24, chunk_seed(cfg.seed, 0)) != again
    rm = AutoModelForSequenceClassification.from_pretrained(str(root / "rm" / "model")).eval()
    flat = [completion_text(c) for r in samples for c in r["completions"]]
    scores = score_with_reward_model(rm, load_tokenizer(str(root / "rm" / "model")), [p for p in prompts for _ in range(2)],
                                     flat, progress=False)
    assert [x for r in samples for x in r["rewards"]] == pytest.approx(scores, abs=1e-5)
    m = read_manifest(vdir)
    assert m["config"]["ama"]["collect_from"] == "aligned" and m["metrics"]["examples"] == 6
