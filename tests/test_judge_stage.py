"""The judge in the evaluate stage: bad setups stop before any model with one `error:` line, a
killed evaluate resumes without asking the judge again, a `serve` judge starts and stops with
the stage, the report shows the judge's columns, and (slow) the tiny world end to end."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY_EXPERIMENT, write_config
from helpers_judge import ALPACA_EXPECTED, MT_BENCH_EXPECTED, JudgeServer, digest, expected_calls, write_judge_data
from taxfree.cli import main
from taxfree.errors import TaxfreeError
from taxfree.pipeline.config import load_config

KEY_ENV = "TEST_JUDGE_KEY"


def _given_models(root: Path) -> tuple[Path, Path]:
    """A tiny causal LM (char tokenizer with a chat template) and a tiny reward model, saved."""
    from helpers_tokenizer import char_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tok = char_tokenizer()
    shape = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    sft, rm = root / "sft_model", root / "rm_model"
    LlamaForCausalLM(LlamaConfig(**shape)).save_pretrained(sft)
    tok.save_pretrained(sft)
    LlamaForSequenceClassification(LlamaConfig(**shape, num_labels=1)).save_pretrained(rm)
    tok.save_pretrained(rm)
    return sft, rm


def _given_run(tmp_path: Path, judge: dict) -> tuple[Path, Path]:
    """A run of the evaluate stage alone on given models, with `evaluate.judge` = judge."""
    sft, rm = _given_models(tmp_path / "models")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("hi", "tell me", "why")))
    data = {"name": "j", "run_dir": str(tmp_path / "runs"), "world": {"kind": "none"}, "stages": ["evaluate", "report"],
            "models": {"sft": str(sft)}, "data": {"eval_prompts": str(prompts)},
            "evaluate": {"reward_model": str(rm), "max_new_tokens": 4, "batch_size": 4, "judge": judge}}
    return write_config(tmp_path, data), tmp_path / "runs" / "j"


def _judge_section(tmp_path: Path, endpoint: str, **kw) -> dict:
    return {"endpoint": endpoint, "model": "judge-test", "api_key_env": KEY_ENV,
            "data_dir": str(write_judge_data(tmp_path / "data")), "max_concurrency": 2, "timeout_s": 1.0,
            "max_retries": 2, "max_new_tokens": 6, **kw}


# -- bad setups: one line, exit 2, before any model ------------------------------------------

def _one_error_line(capsys, rc) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_missing_key_unreachable_endpoint_and_missing_data_stop_before_any_model(tmp_path, monkeypatch, capsys):
    from taxfree.eval.judge.server import free_port

    monkeypatch.delenv(KEY_ENV, raising=False)
    path, root = _given_run(tmp_path, _judge_section(tmp_path, "http://127.0.0.1:9/v1"))
    line = _one_error_line(capsys, main(["run", str(path)]))
    assert line == (f"error: {path}: evaluate.judge.api_key_env: environment variable {KEY_ENV} is not set "
                    "(it must hold the judge's API key)")
    assert not (root / "evaluate").exists()  # preflight: nothing ran

    monkeypatch.setenv(KEY_ENV, "sekret")
    port = free_port()  # nothing listens there
    path, root = _given_run(tmp_path, _judge_section(tmp_path, f"http://127.0.0.1:{port}/v1", max_retries=0))
    line = _one_error_line(capsys, main(["run", str(path)]))
    assert line.startswith(f"error: judge endpoint http://127.0.0.1:{port}/v1: unreachable after 0 retries")
    assert not (root / "evaluate" / "sft").exists() and not (root / "evaluate" / "stage.json").exists()

    section = _judge_section(tmp_path, "http://127.0.0.1:9/v1")
    (Path(section["data_dir"]) / "alpaca_eval" / "alpaca_eval.json").unlink()
    path, root = _given_run(tmp_path, section)
    line = _one_error_line(capsys, main(["run", str(path)]))
    missing = Path(section["data_dir"]) / "alpaca_eval" / "alpaca_eval.json"
    assert line == (f"error: {path}: evaluate.judge.data_dir: {missing}: file not found "
                    "(run `scripts/download_data.sh alpaca_eval`, or point evaluate.judge.data_dir at the directory holding it)")
    assert not (root / "evaluate").exists()

    # An endpoint from an unset variable, and `serve` without the vLLM environment.
    section = {**_judge_section(tmp_path, "${TEST_JUDGE_URL}")}
    monkeypatch.delenv("TEST_JUDGE_URL", raising=False)
    path, _ = _given_run(tmp_path, section)
    assert _one_error_line(capsys, main(["validate", str(path)])) == \
        f"error: {path}: evaluate.judge.endpoint: environment variable TEST_JUDGE_URL is not set"
    monkeypatch.setenv("TAXFREE_VLLM_VENV", str(tmp_path / "no-venv"))
    section = {**_judge_section(tmp_path, None), "serve": str(tmp_path / "models" / "sft_model")}
    path, _ = _given_run(tmp_path, section)
    assert _one_error_line(capsys, main(["validate", str(path)])) == (
        f"error: {path}: evaluate.judge.serve: the vLLM environment ({tmp_path / 'no-venv'}) does not exist: "
        "run `make vllm-env` (or give evaluate.judge.endpoint instead)")


@pytest.mark.parametrize("judge, message", [
    ({"model": "m"}, "evaluate.judge.endpoint: give the judge's OpenAI-compatible base URL"),
    ({"endpoint": "http://x/v1", "serve": "m"}, "evaluate.judge.serve: a served judge has its own endpoint"),
    ({"endpoint": "http://x/v1", "benchmarks": ["mt_bnech"]},
     "evaluate.judge.benchmarks[0]: 'mt_bnech' is not one of mt_bench, alpaca_eval (did you mean mt_bench?)"),
    ({"endpoint": "http://x/v1", "api_key_env": "sk-abc123"}, "evaluate.judge.api_key_env: 'sk-abc123' is not an environment variable name"),
    ({"endpoint": "http://x/v1", "max_concurrency": 0}, "evaluate.judge.max_concurrency: must be >= 1"),
    ({"endpoint": "http://x/v1", "concurrency": 4}, "evaluate.judge.concurrency: unknown key"),
])
def test_bad_judge_settings_are_one_line(tmp_path, judge, message):
    path = write_config(tmp_path, {"name": "x", "evaluate": {"judge": judge}})
    with pytest.raises(TaxfreeError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: {message}")


def test_report_axis_needs_the_judge(tmp_path, tiny_experiment, capsys):
    path, _ = tiny_experiment
    rc = main(["validate", str(path), "--set", "report.reward_axis=mt_bench"])
    assert _one_error_line(capsys, rc) == f"error: {path}: report.reward_axis: mt_bench needs evaluate.judge with mt_bench in its benchmarks"


def test_model_key_has_what_judged_numbers_depend_on(tmp_path, monkeypatch):
    """Where and how fast the judge is asked does not re-evaluate models; the judge model does."""
    from types import SimpleNamespace

    from taxfree.stages.evaluate import EvalModel, model_key

    def key(**judge):
        section = {**_judge_section(tmp_path, "http://127.0.0.1:1/v1"), **judge}
        path = write_config(tmp_path, {"name": "k", "world": {"kind": "none"}, "models": {"sft": "org/m"},
                                       "evaluate": {"judge": section}})
        ctx = SimpleNamespace(cfg=load_config(path), inputs={"prompts": {"hash": "h"}})
        m = EvalModel("sft", "sft", "org/m", {"run_id": "r"})
        return model_key(m, ctx, m)

    base = key()
    assert key(endpoint="http://elsewhere:9/v1", max_concurrency=32, timeout_s=9.0, max_retries=7,
               api_key_env="OTHER_KEY") == base
    assert key(model="another-judge") != base
    assert key(max_new_tokens=99) != base
    assert key(benchmarks=["mt_bench"]) != base


# -- kill and resume --------------------------------------------------------------------------

def _taxfree(args, log: Path, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "taxfree", *map(str, args)], cwd=REPO, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def test_killed_evaluate_resumes_without_repeating_judge_calls(tmp_path):
    env = {**os.environ, KEY_ENV: "sekret", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with JudgeServer(api_key="sekret", delay_s=0.3, slow_s=2.5) as server:
        path, root = _given_run(tmp_path, _judge_section(tmp_path, server.url, max_concurrency=1, timeout_s=2.0))
        judgements = root / "evaluate" / "sft" / "judge" / "judgements.jsonl"
        proc = _taxfree(["run", path], tmp_path / "first.log", env)
        deadline = time.time() + 300
        while not (judgements.is_file() and len(judgements.read_text().splitlines()) >= 3):
            assert proc.poll() is None, (tmp_path / "first.log").read_text()
            assert time.time() < deadline, "no judgements written"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (root / "evaluate" / "sft" / "results.json").exists()  # killed mid-judging
        done = [json.loads(x) for x in judgements.read_text().splitlines()]
        done_digests = {e["prompt_sha256"] for e in done}
        answers_before = (root / "evaluate" / "sft" / "judge" / "answers.jsonl").read_text().splitlines()
        first_calls = len(server.requests)
        assert 3 <= len(done) < 8  # killed part-way through MT-Bench's 8 judgements (each stored when it finishes)

        proc = _taxfree(["run", path], tmp_path / "second.log", env)
        assert proc.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()
        later = server.requests[first_calls:]
        assert not {r["digest"] for r in later} & done_digests  # finished judgements are not asked again
        # Every call of the two runs together: the uninterrupted count plus at most the one in flight.
        assert expected_calls(2) <= len(server.requests) <= expected_calls(2) + 1
        answers_after = (root / "evaluate" / "sft" / "judge" / "answers.jsonl").read_text().splitlines()
        assert answers_after[: len(answers_before)] == answers_before
        keys = [json.loads(x)["key"] for x in answers_after]
        assert len(keys) == len(set(keys)) == 4 + 4 + 6  # each answer generated once

    row = json.loads((root / "evaluate" / "results.json").read_text())["models"][0]
    for k, v in {**MT_BENCH_EXPECTED, **ALPACA_EXPECTED}.items():
        assert row[k] == pytest.approx(v), k
    manifest = (root / "evaluate" / "stage.json").read_text()
    assert "sekret" not in manifest and KEY_ENV in manifest  # the variable's name, never the key


# -- a served judge ---------------------------------------------------------------------------

def _fake_vllm_venv(where: Path) -> Path:
    """A `.vllm-venv/bin/python` that runs the test judge server with vLLM's arguments."""
    venv = where / ".vllm-venv"
    (venv / "bin").mkdir(parents=True)
    py = venv / "bin" / "python"
    py.write_text(f"#!/bin/sh\nexec {sys.executable} {REPO / 'tests' / 'helpers_judge.py'} serve \"$@\"\n")
    py.chmod(0o755)
    return venv


def test_served_judge_starts_with_the_first_model_and_stops_with_the_stage(tmp_path, monkeypatch):
    import openai

    from taxfree.eval.judge.config import JudgeConfig
    from taxfree.eval.judge.session import SERVER_LOG, JudgeSession

    monkeypatch.chdir(tmp_path)
    _fake_vllm_venv(tmp_path)
    judge_dir = tmp_path / "judge_model"
    judge_dir.mkdir()
    (judge_dir / "config.json").write_text("{}")
    cfg = JudgeConfig(serve=str(judge_dir), model="served-judge", data_dir=str(write_judge_data(tmp_path / "data")),
                      serve_args=["--gpu-memory-utilization", "0.5"], serve_timeout_s=60)
    cfg.check()
    stage = tmp_path / "evaluate"
    session = JudgeSession(cfg, stage, source="exp.yaml")
    with session:
        assert not (stage / SERVER_LOG).exists()  # not started before a model needs it
        client = session.client()
        assert client.endpoint.startswith("http://127.0.0.1:")
        assert client.ask([{"role": "user", "content": "Rate: {rate:6}"}]) == "A short explanation. Rating: [[6]]"
        url = client.endpoint
    log = (stage / SERVER_LOG).read_text()
    assert "-m vllm.entrypoints.openai.api_server --model " + str(judge_dir) in log
    assert "--served-model-name served-judge --host 127.0.0.1" in log and "--gpu-memory-utilization 0.5" in log
    assert "stopped on SIGTERM" in log
    probe = openai.OpenAI(base_url=url, api_key="x", timeout=2, max_retries=0)
    with pytest.raises(openai.APIConnectionError):
        probe.models.list()  # the server is gone


# -- the report -------------------------------------------------------------------------------

def test_report_shows_judge_columns_and_plots_the_judge_axis(tmp_path):
    from taxfree.eval.report import build_report, plot_pareto, render_markdown, write_report

    def row(mid, kind, reward, avg, mt, wr, lc, fails, **kw):
        return {"id": mid, "kind": kind, "reward": reward, "scores": {"t": avg}, "mt_bench": mt, "mt_bench_judged": 160 - fails,
                "mt_bench_failures": fails, "alpaca_eval_wr": wr, "alpaca_eval_lc": lc, "alpaca_eval_judged": 805,
                "alpaca_eval_failures": 0, "judge": {"model": "gpt-4"}, **kw}

    results = {"experiment": "x", "baseline": "sft", "benchmarks": [{"task": "t", "metric": "acc"}],
               "models": [row("sft", "sft", 0.1, 50.0, 6.25, 40.0, 41.5, 0, aligned_weight=0.0),
                          row("align/dpo-adamw", "align", 0.9, 45.0, 7.125, 55.0, 50.25, 2, aligned="dpo-adamw",
                              aligned_weight=1.0),
                          row("merge/dpo-adamw-w0.5", "merge", 0.5, 48.0, 6.5, 47.0, 46.0, 1, aligned="dpo-adamw",
                              aligned_weight=0.5)]}
    report = build_report(results)
    md = render_markdown(report, "T")
    header = md.splitlines()[2]
    for col in ("MT-Bench (1-10)", "MT-Bench judged (failed)", "AlpacaEval 2.0 LC (%)", "AlpacaEval 2.0 WR (%)",
                "AlpacaEval 2.0 judged (failed)"):
        assert f"| {col} |" in header or f" {col} |" in header, col
    assert "| `align/dpo-adamw` | 0.900 | 7.12 | 158 (2) | 50.2 | 55.0 | 805 (0) | 45.0 |" in md
    assert "MT-Bench: the mean of the judge's 1-10 ratings by `gpt-4`" in md
    png_reward = plot_pareto(report, "T")
    png_mt = plot_pareto(report, "T", reward_axis="mt_bench")
    assert png_mt[:4] == b"\x89PNG" and png_mt != png_reward
    no_judge = build_report({**results, "models": [{k: v for k, v in r.items() if not k.startswith(("mt_", "alpaca"))}
                                                   for r in results["models"]]})
    assert plot_pareto(no_judge, "T", reward_axis="mt_bench") is None
    assert "MT-Bench" not in render_markdown(no_judge, "T")
    (tmp_path / "evaluate").mkdir()
    (tmp_path / "evaluate" / "results.json").write_text(json.dumps(results))
    write_report(tmp_path, reward_axis="alpaca_eval_lc")
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"


# -- end to end on the tiny world -------------------------------------------------------------

@pytest.mark.slow
def test_tiny_world_gets_mt_bench_and_alpaca_eval_columns_for_every_model(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sekret")
    data = copy.deepcopy(TINY_EXPERIMENT)
    data["run_dir"] = str(tmp_path / "runs")
    data["rm"] = {"epochs": 1, "lr": 3e-3, "batch_size": 16, "max_length": 96, "save_steps": 1000, "logging_steps": 5}
    data["align"] = {"methods": ["dpo"], "optimizers": ["adamw"], "max_steps": 2, "lr": 2e-3, "batch_size": 8,
                     "max_length": 96, "max_prompt_length": 48, "save_steps": 1000, "logging_steps": 2}
    data["merge"] = {"aligned_weights": [0.5]}
    data["stages"] = ["world", "pretrain", "sft", "rm", "align", "merge", "evaluate", "report"]
    data["report"] = {"reward_axis": "mt_bench"}
    with JudgeServer(api_key="sekret") as server:
        data["evaluate"] = {"max_new_tokens": 8, "batch_size": 8, "benchmark_batch_size": 16,
                            "judge": _judge_section(tmp_path, server.url, max_concurrency=4, max_new_tokens=8)}
        path = write_config(tmp_path, data)
        root = tmp_path / "runs" / "t"
        assert main(["run", str(path)]) == 0
        # sft, align/dpo-adamw, merge/dpo-adamw-w0.5: each judgement asked for each model (1 + 2 retries of
        # the two that never parse); the test server's "once" markers count per conversation, so two
        # models with the same answer share those first-attempt failures.
        assert 3 * (12 + 2 * 3) <= len(server.requests) <= 3 * expected_calls(2)

    res = json.loads((root / "evaluate" / "results.json").read_text())
    assert [r["id"] for r in res["models"]] == ["sft", "align/dpo-adamw", "merge/dpo-adamw-w0.5"]
    for r in res["models"]:
        for k, v in {**MT_BENCH_EXPECTED, **ALPACA_EXPECTED}.items():
            assert r[k] == pytest.approx(v), (r["id"], k)
        assert 0.0 <= r["alpaca_eval_lc"] <= 100.0
    md = (root / "report.md").read_text()
    for r in res["models"]:
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| `{r['id']}` |"))
        assert f"| {r['mt_bench']:.2f} | 7 (1) | {r['alpaca_eval_lc']:.1f} | {r['alpaca_eval_wr']:.1f} | 5 (1) |" in line
    assert (root / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((root / "evaluate" / "stage.json").read_text())["metrics"]
    assert metrics["sft/mt_bench"] == pytest.approx(MT_BENCH_EXPECTED["mt_bench"])
