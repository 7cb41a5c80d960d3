"""The judge library (taxfree.eval.judge): strict parsing, the length-controlled GLM, the kill-safe
cache, the data files, and whole scores against a real OpenAI-compatible server on 127.0.0.1
whose replies (and so every number) are known in advance (tests/helpers_judge.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from helpers_judge import (ALPACA_EVAL, ALPACA_EXPECTED, MT_BENCH, MT_BENCH_EXPECTED, REFERENCES, JudgeServer,
                           digest, expected_calls, write_judge_data)
from taxfree.errors import TaxfreeError
from taxfree.eval.judge import alpaca_eval as ae
from taxfree.eval.judge.config import JudgeConfig
from taxfree.eval.judge.data import load_alpaca_eval, load_judge_prompts, load_mt_bench
from taxfree.eval.judge.length_control import (fit_glm, length_controlled_win_rate, length_features, penalized_nll,
                                               win_rate)
from taxfree.eval.judge.parsing import parse_choice, parse_rating
from taxfree.eval.judge.session import JudgeSession
from taxfree.eval.judge.store import JsonlStore


# -- parsing ---------------------------------------------------------------------------------

@pytest.mark.parametrize("reply, rating", [
    ("Good. Rating: [[7]]", 7.0),
    ("[[10]]", 10.0),
    ("Rating: [[ 6.5 ]]", 6.5),
    ("Rating: [[1]] ... I repeat: [[1]]", 1.0),  # the same verdict twice is one verdict
    ("Rating: [7]", None),  # FastChat's fallback [n] is not accepted
    ("Rating: 7", None),
    ("[[7]] or maybe [[8]]", None),  # two different verdicts
    ("[[0]]", None),  # outside 1-10
    ("[[11]]", None),
    ("", None),
    (None, None),
])
def test_rating_is_read_strictly(reply, rating):
    assert parse_rating(reply) == rating


@pytest.mark.parametrize("reply, choice", [
    ("A is better. [[A]]", "A"), ("[[B]]", "B"), ("Equal. [[C]]", "tie"), ("[[A]] ... final: [[A]]", "A"),
    ("[[A]] no, [[B]]", None), ("[A]", None), ("A", None), ("[[D]]", None), ("", None),
])
def test_pairwise_verdict_is_read_strictly(reply, choice):
    assert parse_choice(reply) == choice


# -- the length-controlled win rate ----------------------------------------------------------

def test_nll_matches_plain_arithmetic():
    x = length_features([10, 30, 5, 50], [20, 20, 20, 20])
    y = np.array([0.0, 1.0, 0.5, 1.0])
    w = np.array([0.3, -0.7])
    by_hand = 0.0
    for xi, yi in zip(x.tolist(), y.tolist()):
        p = 1 / (1 + math.exp(-(w[0] * xi[0] + w[1] * xi[1])))
        by_hand -= yi * math.log(p) + (1 - yi) * math.log(1 - p)
    by_hand += 0.5 * 1e-4 * float(w @ w)
    assert penalized_nll(w, x, y) == pytest.approx(by_hand, rel=1e-12)
    # The feature is tanh of the difference over its sample standard deviation.
    d = np.array([-10.0, 10.0, -15.0, 30.0])
    assert x[:, 1] == pytest.approx(np.tanh(d / d.std(ddof=1)))


def test_glm_fit_is_the_minimum_scipy_finds():
    scipy_optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(0)
    n = 300
    ref = rng.integers(50, 400, n)
    model = ref + rng.integers(-200, 300, n)
    x = length_features(model, ref)
    p = 1 / (1 + np.exp(-(0.4 + 1.3 * x[:, 1])))
    y = (rng.random(n) < p).astype(float)
    y[::7] = 0.5  # some ties
    w = fit_glm(x, y)
    best = scipy_optimize.minimize(penalized_nll, np.zeros(2), args=(x, y), method="BFGS", options={"gtol": 1e-10})
    assert w == pytest.approx(best.x, abs=1e-5)
    assert penalized_nll(w, x, y) <= best.fun + 1e-9
    lc = length_controlled_win_rate(y, model, ref)
    assert lc == pytest.approx(100 / (1 + math.exp(-best.x[0])), abs=1e-4)
    # Longer answers won more often here, so controlling for length lowers the win rate.
    assert lc < win_rate(list(y))


def test_length_controlled_win_rate_by_hand():
    # Two lengths only: the model is longer on 10 items (wins 8) and shorter on 5 (wins 1). The fit
    # then matches both groups: sigmoid(theta + phi a) = 0.8, sigmoid(theta - phi a) = 0.2, so
    # theta = (logit 0.8 + logit 0.2) / 2 = 0 and the length-controlled win rate is 50 %, while
    # the plain win rate is 9 / 15 = 60 %.
    outcomes = [1.0] * 8 + [0.0] * 2 + [1.0] * 1 + [0.0] * 4
    model = [300] * 10 + [100] * 5
    ref = [200] * 15
    assert win_rate(outcomes) == pytest.approx(60.0)
    assert length_controlled_win_rate(outcomes, model, ref) == pytest.approx(50.0, abs=1e-3)
    # Equal lengths: no length term; theta solves 4 (sigmoid(theta) - 0.625) + ridge theta = 0 (bisection
    # below), within 2e-3 points of the win rate (ties half) with this ridge and 4 items.
    lo, hi = -5.0, 5.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 4 * (1 / (1 + math.exp(-mid)) - 0.625) + 1e-4 * mid < 0 else (lo, mid)
    by_hand = 100 / (1 + math.exp(-lo))
    assert length_controlled_win_rate([1, 0, 0.5, 1], [5] * 4, [5] * 4) == pytest.approx(by_hand, abs=1e-9)
    assert by_hand == pytest.approx(62.5, abs=2e-3)
    # Every item won: the ridge keeps the fit finite, at a win rate of (almost) 100 %.
    assert 99.9 < length_controlled_win_rate([1.0] * 20, list(range(20)), [10] * 20) <= 100.0
    assert length_controlled_win_rate([], [], []) is None
    with pytest.raises(TaxfreeError):
        length_controlled_win_rate([1.5], [1], [1])


# -- the cache --------------------------------------------------------------------------------

def test_store_survives_a_line_cut_short(tmp_path):
    path = tmp_path / "j.jsonl"
    s = JsonlStore(path)
    s.add({"key": "a", "verdict": 7})
    s.add({"key": "b", "verdict": 3})
    with open(path, "ab") as f:  # a kill in the middle of a write
        f.write(b'{"key": "c", "verd')
    s2 = JsonlStore(path)
    assert set(s2.entries) == {"a", "b"} and s2.get("b")["verdict"] == 3
    s2.add({"key": "c", "verdict": 9})
    s2.add({"key": "a", "verdict": 8})  # a later line for a key wins
    lines = path.read_text().splitlines()
    assert all(json.loads(line) for line in lines) and len(lines) == 4
    s3 = JsonlStore(path)
    assert {k: e["verdict"] for k, e in s3.entries.items()} == {"a": 8, "b": 3, "c": 9}


def test_store_refuses_a_damaged_file(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_text('{"key": "a"}\nnot json\n{"key": "b"}\n')
    with pytest.raises(TaxfreeError, match=r"j.jsonl:2: not a JSON line"):
        JsonlStore(path)


# -- data files -------------------------------------------------------------------------------

def test_upstream_formats_load(tmp_path):
    root = write_judge_data(tmp_path)
    qs = load_mt_bench(root)
    assert [q.question_id for q in qs] == [q[0] for q in MT_BENCH]
    assert [q.reference for q in qs] == [None, REFERENCES[111], None, REFERENCES[121]]
    assert load_mt_bench(root, limit=2)[-1].question_id == 111
    items = load_alpaca_eval(root)
    assert [(i.index, i.instruction, i.reference) for i in items] == [(k, *x) for k, x in enumerate(ALPACA_EVAL)]
    prompts = load_judge_prompts(root / "mt_bench" / "judge_prompts.jsonl", ("single-v1", "pair-v2"))
    assert set(prompts) == {"single-v1", "pair-v2"}


def _rewrite(path, fn):
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(x) + "\n" for x in fn(lines)))


@pytest.mark.parametrize("damage, message", [
    (lambda r: r.joinpath("mt_bench/reference_answer/gpt-4.jsonl").write_text(
        json.dumps({"question_id": 111, "choices": [{"turns": ["5", "20"]}]}) + "\n"),
     r"gpt-4.jsonl: no reference answer for question 121 \(coding"),
    (lambda r: _rewrite(r / "mt_bench/question.jsonl", lambda ls: [{**ls[0], "turns": ls[0]["turns"][:1]}, *ls[1:]]),
     r"question.jsonl:1: 'turns' must be a list of two non-empty strings"),
    (lambda r: _rewrite(r / "mt_bench/question.jsonl", lambda ls: ls + [ls[0]]),
     r"question.jsonl:5: question_id 81 appears twice"),
    (lambda r: _rewrite(r / "mt_bench/judge_prompts.jsonl", lambda ls: [x for x in ls if x["name"] != "single-math-v1"]),
     r"judge_prompts.jsonl: no judge prompt named single-math-v1"),
    (lambda r: r.joinpath("mt_bench/question.jsonl").unlink(),
     r"question.jsonl: file not found \(run `scripts/download_data.sh mt_bench`"),
])
def test_bad_data_is_one_error_naming_the_file(tmp_path, damage, message):
    root = write_judge_data(tmp_path)
    damage(root)
    with pytest.raises(TaxfreeError, match=message):
        from taxfree.eval.judge.data import check_data

        check_data(["mt_bench", "alpaca_eval"], root)


def test_model_side_is_a_seeded_fair_coin_per_item():
    texts = [f"instruction {i}" for i in range(400)]
    first = [ae.model_first(0, t) for t in texts]
    assert 160 < sum(first) < 240  # about half the items show the model first
    assert first == [ae.model_first(0, t) for t in texts]  # the same on every run
    assert first != [ae.model_first(1, t) for t in texts]  # the seed changes the draw
    assert ae.outcome("A", True) == 1.0 and ae.outcome("B", True) == 0.0
    assert ae.outcome("A", False) == 0.0 and ae.outcome("B", False) == 1.0 and ae.outcome("tie", False) == 0.5


# -- whole scores against the test server -----------------------------------------------------

@pytest.fixture(scope="module")
def tiny_lm():
    from helpers_tokenizer import char_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = char_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id)).eval()
    return model, tok


def _session(tmp_path, server, monkeypatch, **kw):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sekret")
    data = write_judge_data(tmp_path / "data")
    cfg = JudgeConfig(endpoint=server.url, model="judge-test", api_key_env="TEST_JUDGE_KEY", data_dir=str(data),
                      max_concurrency=3, timeout_s=0.5, max_retries=2, max_new_tokens=6, **kw)
    cfg.check()
    return JudgeSession(cfg, tmp_path / "evaluate", source="exp.yaml", batch_size=4, seed=0)


def _user(req) -> str:
    return req["messages"][-1]["content"]


def test_scores_from_known_replies_and_the_cache(tmp_path, tiny_lm, monkeypatch):
    model, tok = tiny_lm
    mdir = tmp_path / "evaluate" / "sft"
    with JudgeServer(api_key="sekret", slow_s=1.5) as server, _session(tmp_path, server, monkeypatch) as judge:
        out = judge.score(model, tok, {"run_id": "model-1"}, mdir)
        calls = len(server.requests)

        # MT-Bench by hand from the markers (tests/helpers_judge.py): a turn that never parses fails.
        for k, v in MT_BENCH_EXPECTED.items():
            assert out[k] == pytest.approx(v), k
        # AlpacaEval: win, loss, tie, win, (failure), win.
        for k, v in ALPACA_EXPECTED.items():
            assert out[k] == pytest.approx(v), k
        outputs = json.loads((mdir / "judge" / "alpaca_eval_outputs.json").read_text())
        assert [o["instruction"] for o in outputs] == [i for i, _ in ALPACA_EVAL]
        judged = [0, 1, 2, 3, 5]
        lengths = [len(outputs[i]["output"]) for i in judged]
        refs = [len(ALPACA_EVAL[i][1]) for i in judged]
        assert out["alpaca_eval_lc"] == pytest.approx(length_controlled_win_rate([1, 0, 0.5, 1, 1], lengths, refs))

        # Every call the markers cause, no more: retries of the unparseable, the 429, the 500 and
        # the timed-out reply, and 1 + max_retries attempts of a reply that never parses.
        assert calls == expected_calls(max_retries=2)
        assert all(r["temperature"] == 0.0 and r["max_tokens"] == 2048 for r in server.requests)
        statuses = sorted(r["status"] for r in server.requests)
        assert statuses.count(429) == 1 and statuses.count(500) == 1

        # Failures are recorded with their text.
        failures = json.loads((mdir / "judge" / "failures.json").read_text())
        assert sorted((f["benchmark"], f["item"], f["turn"]) for f in failures) == [("alpaca_eval", 4, 1), ("mt_bench", 121, 2)]
        assert all(f["failure"] == "unparseable reply" and f["reply"] == "The answer is fine. Rating: 7 out of 10."
                   and f["attempts"] == 3 for f in failures)

        # FastChat's prompt per category and turn; turn 2 shows the model's own turn-1 answer.
        answers = {json.loads(x)["question_id"]: json.loads(x)["choices"][0]["turns"]
                   for x in (mdir / "judge" / "mt_bench_answers.jsonl").read_text().splitlines()}
        ok = {(r["messages"][-1]["content"].split("\n")[0], r["digest"]): r for r in server.ok_replies()}
        heads = sorted({h for h, _ in ok})
        assert heads == ["GRADE-MATH-T1", "GRADE-MATH-T2", "GRADE-T1", "GRADE-T2", "[User Question]"]
        math_t2 = [r for (h, _), r in ok.items() if h == "GRADE-MATH-T2" and "Times 4?" in _user(r)]
        assert math_t2 and "### Reference answer:\n5\n" in _user(math_t2[0]) and "### Reference answer:\n20\n" in _user(math_t2[0])
        assert f"### Assistant A:\n{answers[111][0]}\n" in _user(math_t2[0])
        writing_t2 = [r for (h, _), r in ok.items() if h == "GRADE-T2" and "Shorter." in _user(r)]
        assert writing_t2 and f"### Assistant A:\n{answers[81][0]}\n\n### User:\nShorter." in _user(writing_t2[0])
        assert all("[Reference]" not in _user(r) for (h, _), r in ok.items() if h == "GRADE-T1")
        # The model's side in the pairwise prompt follows the seeded coin, item by item.
        for i, (instruction, reference) in enumerate(ALPACA_EVAL):
            (req,) = {r["digest"]: r for r in server.ok_replies() if instruction in _user(r)}.values()
            ref_first = _user(req).index(reference) < _user(req).index("[Assistant B]")
            assert ref_first == (not ae.model_first(0, instruction))

        # Judged again (a re-run): everything from the cache, no generation, no judge call.
        import taxfree.eval.judge.answers as answers_mod

        def no_generation(*a, **k):
            raise AssertionError("answers were generated again")

        monkeypatch.setattr(answers_mod, "generate_answers", no_generation)
        again = judge.score(model, tok, {"run_id": "model-1"}, mdir)
        assert len(server.requests) == calls
        assert {k: v for k, v in again.items() if k != "judge"} == {k: v for k, v in out.items() if k != "judge"}

    # A fresh session on the same cache (a new process) asks nothing either; a new model (a new
    # merge point) costs exactly its own calls.
    monkeypatch.undo()
    with JudgeServer(api_key="sekret", slow_s=1.5) as server, _session(tmp_path, server, monkeypatch) as judge:
        judge.score(model, tok, {"run_id": "model-1"}, mdir)
        assert server.requests == []
        judge.score(model, tok, {"run_id": "model-2"}, tmp_path / "evaluate" / "merge" / "p")
        assert len(server.requests) == expected_calls(max_retries=2)


def test_rejected_requests_fail_alone_and_a_dead_endpoint_stops(tmp_path, tiny_lm, monkeypatch):
    model, tok = tiny_lm
    mt = [(1, "writing", "One. {rate:6}", "Two. {rate:8}"), (2, "stem", "Three. {reject}", "Four. {rate:2}")]
    alpaca = [("Say yes. {win}", "REFERENCE: yes"), ("Say no. {lose}", "REFERENCE: no")]
    with JudgeServer(api_key="sekret") as server:
        judge = _session(tmp_path, server, monkeypatch)
        write_judge_data(tmp_path / "data", mt_bench=mt, references={}, alpaca=alpaca)
        with judge:
            out = judge.score(model, tok, {"run_id": "m"}, tmp_path / "m")
        assert out["mt_bench"] == pytest.approx((6 + 8 + 2) / 3) and out["mt_bench_failures"] == 1
        assert out["mt_bench_by_category"] == {"writing": 7.0, "stem": 2.0}
        (failure,) = json.loads((tmp_path / "m" / "judge" / "failures.json").read_text())
        assert failure["item"] == 2 and failure["turn"] == 1 and failure["failure"].startswith("HTTP 400: this prompt is rejected")
        rejected = [r for r in server.requests if r["status"] == 400]
        assert len(rejected) == 1  # a client error is not asked again
        assert out["alpaca_eval_wr"] == 50.0

    # The endpoint gone mid-run: one error line; what was judged before stays in the cache.
    def down_after(messages, attempt, real=JudgeServer.decide):
        if "Two." in messages[-1]["content"].rsplit("### User:", 1)[-1]:
            return 503, "overloaded", {"retry-after-ms": "5"}, 0.0
        return real(server2, messages, attempt)

    (tmp_path / "m2").mkdir()
    with JudgeServer(api_key="sekret") as server2:
        server2.decide = down_after
        judge = _session(tmp_path, server2, monkeypatch)
        write_judge_data(tmp_path / "data", mt_bench=mt, references={}, alpaca=alpaca)
        with judge, pytest.raises(TaxfreeError) as e:
            judge.score(model, tok, {"run_id": "m2"}, tmp_path / "m2")
    msg = str(e.value)
    assert "HTTP 503 after 2 retries" in msg and "\n" not in msg and "run again to continue" in msg
    assert sum(1 for r in server2.requests if "Two." in _user(r).rsplit("### User:", 1)[-1]) == 3  # 1 + 2 retries
    done = JsonlStore(tmp_path / "m2" / "judge" / "judgements.jsonl")
    assert len(done) >= 1 and all(e["failure"] is None or e["failure"].startswith("HTTP 400") for e in done.entries.values())
    assert {digest(r["messages"]) for r in server2.ok_replies()} >= {e["prompt_sha256"] for e in done.entries.values()
                                                                    if e["failure"] is None}


def test_requests_in_flight_never_exceed_max_concurrency(tmp_path, tiny_lm, monkeypatch):
    model, tok = tiny_lm
    alpaca = [(f"Item {i}. {{win}}", f"REFERENCE: {i}") for i in range(8)]
    with JudgeServer(api_key="sekret", delay_s=0.3) as server:
        judge = _session(tmp_path, server, monkeypatch)
        judge.cfg.max_concurrency, judge.cfg.benchmarks = 3, ["alpaca_eval"]
        write_judge_data(tmp_path / "data", alpaca=alpaca)
        with judge:
            out = judge.score(model, tok, {"run_id": "m"}, tmp_path / "m")
    assert out["alpaca_eval_wr"] == 100.0 and len(server.requests) == 8
    assert server.max_in_flight == 3  # parallel, and never more than asked


def test_endpoint_checks(tmp_path, monkeypatch):
    from taxfree.eval.judge.server import free_port

    with JudgeServer(api_key="sekret") as server:
        # A wrong key: refused before any model.
        monkeypatch.setenv("TEST_JUDGE_KEY", "wrong")
        data = write_judge_data(tmp_path / "data")
        cfg = JudgeConfig(endpoint=server.url, model="judge-test", api_key_env="TEST_JUDGE_KEY", data_dir=str(data),
                          max_retries=0, timeout_s=2)
        with pytest.raises(TaxfreeError, match=r"the API key was refused \(HTTP 401"):
            with JudgeSession(cfg, tmp_path / "ev"):
                pass
        # A model the endpoint does not serve: the first question stops the run (HTTP 404).
        monkeypatch.setenv("TEST_JUDGE_KEY", "sekret")
        cfg = JudgeConfig(endpoint=server.url, model="no-such-judge", api_key_env="TEST_JUDGE_KEY", data_dir=str(data),
                          max_retries=0, timeout_s=2)
        with JudgeSession(cfg, tmp_path / "ev") as session, pytest.raises(TaxfreeError, match=r"no model 'no-such-judge' there"):
            session.client().ask([{"role": "user", "content": "{rate:5}"}])
    port = free_port()
    cfg = JudgeConfig(endpoint=f"http://127.0.0.1:{port}/v1", model="m", data_dir=str(data), max_retries=1, timeout_s=1)
    with pytest.raises(TaxfreeError, match=rf"judge endpoint http://127.0.0.1:{port}/v1: unreachable after 1 retries"):
        with JudgeSession(cfg, tmp_path / "ev"):
            pass


def test_download_writes_the_upstream_layout_and_checks_hashes(tmp_path, monkeypatch, capsys):
    """The download without the network: the upstream files served from fixtures (same bytes path)."""
    import hashlib

    import huggingface_hub

    from taxfree.eval.judge import download as dl
    from taxfree.eval.judge.data import check_data

    src = write_judge_data(tmp_path / "upstream")
    upstream = {"mt_bench/question.jsonl": src / "mt_bench/question.jsonl",
                "judge_prompts.jsonl": src / "mt_bench/judge_prompts.jsonl",
                "mt_bench/reference_answer/gpt-4.jsonl": src / "mt_bench/reference_answer/gpt-4.jsonl"}
    fetched = []

    def fetch(url, timeout=60.0):
        fetched.append(url)
        return upstream[url.removeprefix(dl.FASTCHAT_DATA)].read_bytes()

    monkeypatch.setattr(dl, "_fetch", fetch)
    monkeypatch.setattr(dl, "MT_BENCH_FILES", {name: (up, hashlib.sha256(upstream[up].read_bytes()).hexdigest())
                                               for name, (up, _) in dl.MT_BENCH_FILES.items()})
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo_id, filename, repo_type: str(src / "alpaca_eval" / "alpaca_eval.json")
                        if (repo_id, filename, repo_type) == ("tatsu-lab/alpaca_eval", "alpaca_eval_gpt4_baseline.json", "dataset")
                        else None)
    data = tmp_path / "data"
    assert dl.main(["mt_bench", "--out", str(data / "mt_bench")]) == 0
    assert dl.main(["alpaca_eval", "--out", str(data / "alpaca_eval")]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{data / 'mt_bench'}: 4 questions", f"{data / 'alpaca_eval'}: 6 instructions"]
    assert all(url.startswith(f"https://raw.githubusercontent.com/lm-sys/FastChat/{dl.FASTCHAT_COMMIT}/") for url in fetched)
    for name, (up, _) in dl.MT_BENCH_FILES.items():
        assert (data / "mt_bench" / name).read_bytes() == upstream[up].read_bytes()
    assert sorted(p.name for p in (data / "mt_bench").iterdir()) == ["judge_prompts.jsonl", "question.jsonl", "reference_answer"]
    assert (data / "alpaca_eval" / "alpaca_eval.json").read_bytes() == (src / "alpaca_eval" / "alpaca_eval.json").read_bytes()
    check_data(["mt_bench", "alpaca_eval"], data)  # the layout evaluate.judge.data_dir reads

    # A finished download is not replaced without --force; a changed upstream file is refused.
    assert dl.main(["mt_bench", "--out", str(data / "mt_bench")]) == 2
    assert "output directory exists and is not empty (use --force" in capsys.readouterr().err
    upstream["judge_prompts.jsonl"] = src / "mt_bench" / "question.jsonl"
    assert dl.main(["mt_bench", "--out", str(data / "mt_bench"), "--force"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: https://raw.githubusercontent.com/") and "(a changed upstream file)" in err
    assert (data / "mt_bench" / "judge_prompts.jsonl").read_bytes() == (src / "mt_bench/judge_prompts.jsonl").read_bytes()
