"""The judge for one evaluate stage: checked before any model, then one `score` call per model.

    with open_judge(cfg.evaluate.judge, stage_dir, source=cfg.source, batch_size=16, seed=0) as judge:
        for each model: row.update(judge.score(model, tokenizer, identity, model_dir))

`preflight` (also run by `taxfree validate` and before a run's first stage) reads the
environment variables the section names and every data file it needs. Entering the session
loads the data and, for a remote endpoint, checks that it answers; a `serve` judge is started at
the first model that needs it and stopped when the session ends. Each model's answers and
judgements are cached below its evaluate directory (`<model dir>/judge/`): answers.jsonl,
judgements.jsonl (every reply, failures with their text), plus the answers in FastChat's and
AlpacaEval's own formats and a failures.json of the current failures.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from taxfree.atomic import atomic_write_json, atomic_write_text
from taxfree.errors import TaxfreeError
from taxfree.eval.judge import alpaca_eval, mt_bench
from taxfree.eval.judge.answers import cached_answers
from taxfree.eval.judge.config import JudgeConfig
from taxfree.eval.judge.data import (ALPACA_EVAL_PROMPT, JUDGE_PROMPTS, MT_BENCH_PROMPTS, check_data, files_for,
                                     load_alpaca_eval, load_judge_prompts, load_mt_bench)
from taxfree.eval.judge.judging import run_jobs
from taxfree.eval.judge.store import JsonlStore

JUDGE_DIR = "judge"  # below each model's evaluate directory
SERVER_LOG = "judge_server.log"  # in the stage directory
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(value: str, key: str, source: str) -> str:
    """`${NAME}` replaced by the environment variable NAME; an unset or empty one is an error."""
    def sub(m):
        v = os.environ.get(m.group(1))
        if not v:
            raise TaxfreeError(f"{source}: evaluate.judge.{key}: environment variable {m.group(1)} is not set")
        return v

    return _VAR.sub(sub, value)


def api_key(cfg: JudgeConfig, source: str) -> str | None:
    if cfg.api_key_env is None:
        return None
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise TaxfreeError(f"{source}: evaluate.judge.api_key_env: environment variable {cfg.api_key_env} is not set "
                           "(it must hold the judge's API key)")
    return key


def judge_inputs(cfg: JudgeConfig) -> dict[str, tuple[None, str]]:
    """The data files as stage inputs: editing one re-judges."""
    return {name: (None, str(path)) for name, path in files_for(cfg.benchmarks, cfg.data_dir).items()}


def preflight(cfg: JudgeConfig, source: str) -> None:
    """Everything checkable without the network: variables, data files, the serve setup."""
    from taxfree.eval.judge.server import require_vllm_python

    expand_env(cfg.model, "model", source)
    if cfg.endpoint is not None:
        expand_env(cfg.endpoint, "endpoint", source)
    api_key(cfg, source)
    try:
        check_data(cfg.benchmarks, cfg.data_dir, cfg.limit)
    except TaxfreeError as e:
        raise TaxfreeError(f"{source}: evaluate.judge.data_dir: {e}") from None
    if cfg.serve is not None:
        from taxfree.pipeline.paths import looks_like_hub_id

        if not looks_like_hub_id(cfg.serve) and not (Path(cfg.serve) / "config.json").is_file():
            raise TaxfreeError(f"{source}: evaluate.judge.serve: model directory not found: {cfg.serve}")
        try:
            require_vllm_python()
        except TaxfreeError as e:
            raise TaxfreeError(f"{source}: {e}") from None


class JudgeSession:
    def __init__(self, cfg: JudgeConfig, stage_dir: str | os.PathLike, *, source: str = "<config>",
                 batch_size: int = 16, seed: int = 0):
        self.cfg, self.stage_dir, self.source = cfg, Path(stage_dir), source
        self.batch_size, self.seed = batch_size, seed
        self._stack = contextlib.ExitStack()
        self._client = None

    # -- lifetime ------------------------------------------------------------------------------
    def __enter__(self) -> "JudgeSession":
        cfg = self.cfg
        preflight(cfg, self.source)
        self.model = expand_env(cfg.model, "model", self.source)
        self.key = api_key(cfg, self.source)
        names = (MT_BENCH_PROMPTS if "mt_bench" in cfg.benchmarks else ()) + \
            ((ALPACA_EVAL_PROMPT,) if "alpaca_eval" in cfg.benchmarks else ())
        self.prompts = load_judge_prompts(Path(cfg.data_dir) / JUDGE_PROMPTS, names)
        self.questions = load_mt_bench(cfg.data_dir, cfg.limit) if "mt_bench" in cfg.benchmarks else []
        self.items = load_alpaca_eval(cfg.data_dir, cfg.limit) if "alpaca_eval" in cfg.benchmarks else []
        if cfg.serve is None:  # a remote judge must answer before any model is evaluated
            self._connect(expand_env(cfg.endpoint, "endpoint", self.source))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _connect(self, endpoint: str):
        from taxfree.eval.judge.client import JudgeClient

        cfg = self.cfg
        client = JudgeClient(endpoint, self.model, self.key, cfg.timeout_s, cfg.max_retries, cfg.temperature,
                             cfg.max_tokens)
        self._stack.callback(client.close)
        client.check()
        self._client = client
        return client

    def client(self):
        """The judge client; a `serve` judge is started on first use."""
        if self._client is None:
            from taxfree.eval.judge.server import serve_judge

            url = self._stack.enter_context(serve_judge(self.cfg.serve, self.model, self.stage_dir / SERVER_LOG,
                                                        self.cfg.serve_args, self.cfg.serve_timeout_s))
            self._connect(url)
        return self._client

    # -- one model -----------------------------------------------------------------------------
    def score(self, model, tokenizer, identity, model_dir: str | os.PathLike) -> dict:
        """The judged numbers of one model (keys mt_bench*, alpaca_eval*); caches below model_dir/judge/."""
        jdir = Path(model_dir) / JUDGE_DIR
        answers = JsonlStore(jdir / "answers.jsonl")
        judgements = JsonlStore(jdir / "judgements.jsonl")
        out: dict = {}
        failures: list[dict] = []
        gen = {"max_new_tokens": self.cfg.max_new_tokens, "batch_size": self.batch_size}
        if self.questions:
            qs = self.questions
            first = cached_answers(answers, model, tokenizer, identity, [mt_bench.conversations(q) for q in qs],
                                   desc="MT-Bench turn 1", **gen)
            second = cached_answers(answers, model, tokenizer, identity,
                                    [mt_bench.conversations(q, a) for q, a in zip(qs, first)], desc="MT-Bench turn 2",
                                    **gen)
            by_id = {q.question_id: [a1, a2] for q, a1, a2 in zip(qs, first, second)}
            _write_jsonl(jdir / "mt_bench_answers.jsonl",
                         [{"question_id": q.question_id, "model_id": str(model_dir), "choices": [{"index": 0, "turns": by_id[q.question_id]}]}
                          for q in qs])
            entries = run_jobs(mt_bench.judge_jobs(qs, by_id, self.prompts), identity, self.client(), judgements,
                               self.cfg.max_concurrency, self.cfg.max_retries, desc="judging MT-Bench")
            out.update(mt_bench.score(qs, entries))
            failures += [e for e in entries if e.get("failure") is not None]
        if self.items:
            items = self.items
            texts = cached_answers(answers, model, tokenizer, identity, [alpaca_eval.conversation(i) for i in items],
                                   desc="AlpacaEval", **gen)
            atomic_write_json(jdir / "alpaca_eval_outputs.json",
                              [{"instruction": i.instruction, "output": t, "generator": str(model_dir), "dataset": "alpaca_eval"}
                               for i, t in zip(items, texts)])
            entries = run_jobs(alpaca_eval.judge_jobs(items, texts, self.prompts, self.seed), identity, self.client(),
                               judgements, self.cfg.max_concurrency, self.cfg.max_retries, desc="judging AlpacaEval")
            out.update(alpaca_eval.score(items, texts, entries, self.seed))
            failures += [e for e in entries if e.get("failure") is not None]
        atomic_write_json(jdir / "failures.json", failures)
        out["judge"] = {"model": self.model, "benchmarks": list(self.cfg.benchmarks), "failures_file":
                        str(jdir / "failures.json")}
        return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    import json

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def open_judge(cfg: JudgeConfig | None, stage_dir, *, source: str = "<config>", batch_size: int = 16, seed: int = 0):
    """A JudgeSession context, or one yielding None when the judge is off."""
    if cfg is None:
        return contextlib.nullcontext(None)
    return JudgeSession(cfg, stage_dir, source=source, batch_size=batch_size, seed=seed)
