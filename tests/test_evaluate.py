"""The evaluate stage: config, model discovery, benchmark resolution and the per-model cache (fast, no training)."""

import json

import pytest

from conftest import write_config
from taxfree.errors import ConfigError, TaxfreeError
from taxfree.pipeline import manifest as mf
from taxfree.pipeline.config import load_config
from taxfree.pipeline.runner import Runner
from taxfree.stages import evaluate


def _model_dir(d):
    (d / "model").mkdir(parents=True)
    (d / "model" / "config.json").write_text("{}")


def _given_model(d, tokenizer=False):
    """A model directory that passes the runner's input checks (config, a safetensors header,
    a tokenizer) without weights: the model work itself is replaced by `fake_eval`."""
    from helpers_tokenizer import char_tokenizer

    d.mkdir(parents=True)
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "model.safetensors").write_bytes(len(b"{}      ").to_bytes(8, "little") + b"{}      ")
    if tokenizer:
        char_tokenizer().save_pretrained(d)


def _setup(tmp_path, **evaluate_section):
    """A non-tiny run whose SFT and reward models are given paths and whose align stage is hand-made."""
    sft = tmp_path / "sft_model"
    _given_model(sft, tokenizer=True)
    rm = tmp_path / "rm_model"
    _given_model(rm)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(3)))
    data = {"name": "e", "run_dir": str(tmp_path / "runs"), "world": {"kind": "none"},
            "stages": ["align", "evaluate", "report"],  # no merge / ama here: the model stages are hand-made
            "models": {"sft": str(sft)}, "data": {"eval_prompts": str(prompts)},
            "evaluate": {"reward_model": str(rm), "benchmarks": ["fake:acc"], **evaluate_section}}
    return write_config(tmp_path, data), tmp_path / "runs" / "e"


def _finish_align(path, root, variants):
    """What the align stage leaves: a variant directory per model and a stage manifest."""
    cfg = load_config(path)
    for v in variants:
        vdir = root / "align" / v
        if not (vdir / mf.MANIFEST).is_file():
            _model_dir(vdir)
            mf.write_manifest(vdir, {"stage": "align", "variant": v, "run_id": mf.new_run_id(), "key": "k"})
    key = Runner(cfg).stage_key("align", [])
    mf.write_manifest(root / "align", {"stage": "align", "key": key, "run_id": mf.new_run_id()})


@pytest.fixture
def fake_eval(monkeypatch):
    """Replace the model work by a stand-in that records which models were evaluated."""
    calls = []

    def fake(m, shared, mdir, sft_responses):
        calls.append(m.id)
        (mdir / "responses.jsonl").write_text("".join(json.dumps({"prompt": p, "response": "r"}) + "\n" for p in shared.prompts))
        score = 50.0 if m.kind == "sft" else 40.0
        return {"id": m.id, "kind": m.kind, "path": m.path, "aligned": m.aligned, "aligned_weight": m.aligned_weight,
                "reward": 0.5, "gold_reward": None, "pairrm_win_rate": None,
                "benchmarks": {"fake": {"acc": score / 100}}, "scores": {"fake": score}}

    monkeypatch.setattr(evaluate, "evaluate_model", fake)
    return calls


def test_second_evaluate_runs_only_the_new_model(tmp_path, fake_eval):
    path, root = _setup(tmp_path)
    _finish_align(path, root, ["dpo-adamw"])
    Runner(load_config(path)).run(["evaluate"])
    assert fake_eval == ["sft", "align/dpo-adamw"]
    res = json.loads((root / "evaluate" / "results.json").read_text())
    assert [r["id"] for r in res["models"]] == ["sft", "align/dpo-adamw"]
    assert (root / "evaluate" / "align" / "dpo-adamw" / "results.json").is_file()
    m = mf.read_manifest(root / "evaluate")
    assert m["metrics"]["align/dpo-adamw/tax_average"] == pytest.approx(10.0)
    assert m["metrics"]["sft/tax_average"] == 0.0

    # The align stage re-runs with one more variant: only that one is evaluated.
    fake_eval.clear()
    _finish_align(path, root, ["dpo-adamw", "ipo-adamw"])
    Runner(load_config(path)).run(["evaluate"])
    assert fake_eval == ["align/ipo-adamw"]
    res = json.loads((root / "evaluate" / "results.json").read_text())
    assert [r["id"] for r in res["models"]] == ["sft", "align/dpo-adamw", "align/ipo-adamw"]
    assert res["evaluated_this_run"] == ["align/ipo-adamw"]

    # Unchanged: the whole stage is skipped.
    fake_eval.clear()
    Runner(load_config(path)).run(["evaluate"])
    assert fake_eval == []

    # A changed evaluation setting re-evaluates every model.
    Runner(load_config(path, ["evaluate.max_new_tokens=8"])).run(["evaluate"])
    assert fake_eval == ["sft", "align/dpo-adamw", "align/ipo-adamw"]

    # A variant that is gone leaves the results.
    import shutil

    shutil.rmtree(root / "align" / "ipo-adamw")
    _finish_align(path, root, ["dpo-adamw"])
    fake_eval.clear()
    Runner(load_config(path, ["evaluate.max_new_tokens=8"])).run(["evaluate"])
    assert fake_eval == []
    assert not (root / "evaluate" / "align" / "ipo-adamw").exists()


def test_models_setting_and_merge_metadata(tmp_path, fake_eval):
    path, root = _setup(tmp_path, models=["align/dpo-adamw"])
    _finish_align(path, root, ["dpo-adamw", "ipo-adamw"])
    Runner(load_config(path)).run(["evaluate"])
    assert fake_eval == ["sft", "align/dpo-adamw"]  # the SFT baseline always comes along

    path, root = _setup(tmp_path / "b", models=["align/dpo-adam"])
    _finish_align(path, root, ["dpo-adamw"])
    with pytest.raises(TaxfreeError, match="'align/dpo-adam' is not a model of this run .did you mean align/dpo-adamw"):
        Runner(load_config(path)).run(["evaluate"])

    # A merge point names its aligned variant and weight in its manifest.
    cfg = load_config(path, ["evaluate.models=null"])
    mdir = root / "merge" / "dpo-adamw" / "p1"
    _model_dir(mdir)
    mf.write_manifest(mdir, {"run_id": "x", "config": {"merge": {"aligned_weight": 0.25}, "aligned": "dpo-adamw"}})
    models = evaluate.run_models(cfg, {"sft": {"path": "s"}, "align": {}, "merge": {}})
    merge = next(m for m in models if m.kind == "merge")
    assert (merge.id, merge.aligned, merge.aligned_weight) == ("merge/dpo-adamw/p1", "dpo-adamw", 0.25)


def test_benchmark_resolution(tmp_path):
    path, _ = _setup(tmp_path, benchmarks=["ama_paper", "arc_easy", "mytask", "mt:bleu"], opencompass=["math401"])
    tasks = evaluate.benchmark_tasks(load_config(path))
    names = [t.task for t in tasks]
    assert names[:7] == ["arc_easy", "arc_challenge", "race", "piqa", "squadv2", "drop", "wmt14-fr-en"]
    assert names.count("arc_easy") == 1 and names[-3:] == ["mytask", "mt", "math401"]
    by = {t.task: t for t in tasks}
    assert by["mt"].to_percent == 1.0 and by["mytask"].metric == "" and by["math401"].runner == "opencompass"
    assert evaluate.counted_metric(by["mytask"], {"mytask": {"f1": 0.3, "exact_match": 0.2}}).metric == "exact_match"

    path, _ = _setup(tmp_path / "c", benchmarks=["online_merging_paper"])
    with pytest.raises(TaxfreeError, match="humaneval, mbpp run model-written code"):
        evaluate.benchmark_tasks(load_config(path))
    path, _ = _setup(tmp_path / "d", benchmarks=["tiny_knowledge"])
    with pytest.raises(TaxfreeError, match="only in the tiny world"):
        evaluate.benchmark_tasks(load_config(path))


@pytest.mark.parametrize("key,value,why", [
    ("max_new_tokens", 0, "must be >= 1"),
    ("top_p", 1.5, "must be in \\(0, 1\\]"),
    ("limit", 0, "must be >= 1"),
    ("benchmarks", ["a:b:c"], "'a:b:c': expected 'task', 'task:metric' or a suite name"),
    ("models", [], "list at least one model"),
    ("reward_batch_size", 0, "must be >= 1"),
])
def test_bad_evaluate_settings_are_one_line(tmp_path, key, value, why):
    path, _ = _setup(tmp_path, **{key: value})
    with pytest.raises(ConfigError, match=f"evaluate.{key}: {why}") as e:
        load_config(path)
    assert "\n" not in str(e.value)


def test_evaluate_inputs_name_the_model_stages(tiny_experiment):
    path, _ = tiny_experiment
    cfg = load_config(path)
    ins = evaluate.inputs(cfg)
    assert ins["sft"][0] == "sft" and ins["align"][0] == "align" and ins["reward_model"][0] == "rm"
    assert ins["prompts"][0] == "world" and "pairrm" not in ins
    assert "merge" not in ins and "ama" not in ins  # enabled, but read only once they have a result
    assert "evaluate" in cfg.enabled_stages() and "report" in cfg.enabled_stages()
    cfg = load_config(path, ["evaluate.pairrm=some/pairrm", "evaluate.reward_model=other/rm"])
    ins = evaluate.inputs(cfg)
    assert ins["pairrm"] == (None, "some/pairrm") and ins["reward_model"] == (None, "other/rm")
