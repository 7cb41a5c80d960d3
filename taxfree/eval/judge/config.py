"""`evaluate.judge`: which OpenAI-compatible judge grades which benchmarks, and how hard to try.

A plain dataclass read by the config machinery (taxfree.pipeline.schema); `check()` raises
ConfigError with a key relative to this section. Values that name the outside world (the
endpoint, the judge model) may be written `${NAME}` and are read from the environment when the
evaluate stage is planned, so a preset carries no URL, and never a key: `api_key_env` is the
NAME of the variable that holds it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from taxfree.pipeline.schema import require as _require

BENCHMARKS = ("mt_bench", "alpaca_eval")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class JudgeConfig:
    """MT-Bench and AlpacaEval 2.0 graded by a language model behind an OpenAI-compatible API."""

    # Base URL of the API (OpenAI, `vllm serve`, llama.cpp's server, SGLang, TGI), e.g.
    # http://127.0.0.1:8000/v1 or ${TAXFREE_JUDGE_ENDPOINT}; null when `serve` starts one.
    endpoint: str | None = None
    model: str = "gpt-4"  # the judge model's name at the endpoint (or ${VARIABLE})
    api_key_env: str | None = None  # NAME of the environment variable holding the key; null = no key
    benchmarks: list[Literal["mt_bench", "alpaca_eval"]] = field(default_factory=lambda: list(BENCHMARKS))
    # Holds mt_bench/{question.jsonl, judge_prompts.jsonl, reference_answer/gpt-4.jsonl} and
    # alpaca_eval/alpaca_eval.json, as `scripts/download_data.sh mt_bench|alpaca_eval` writes them.
    data_dir: str = "data"
    max_concurrency: int = 8  # judge requests in flight at once
    timeout_s: float = 120.0  # per request
    max_retries: int = 5  # per request: timeouts, 429 and 5xx (with backoff), and unparseable replies
    temperature: float = 0.0  # of the judge (FastChat's and AlpacaEval's: 0)
    max_tokens: int = 2048  # of a judge reply (FastChat's)
    max_new_tokens: int = 1024  # of an evaluated model's answer (FastChat's)
    limit: int | None = None  # first N questions / instructions of each benchmark; null = all
    # A judge model directory (or hub id) to serve on 127.0.0.1 with vLLM for the stage's duration
    # (needs `make vllm-env`); `endpoint` stays null then. serve_args go to vLLM's server.
    serve: str | None = None
    serve_args: list[str] = field(default_factory=list)
    serve_timeout_s: float = 1800.0  # how long the local server may take to come up

    def check(self):
        _require(self.endpoint is not None or self.serve is not None, "endpoint",
                 "give the judge's OpenAI-compatible base URL (or `serve: MODEL_DIR` to start one)")
        _require(self.endpoint is None or self.serve is None, "serve",
                 "a served judge has its own endpoint: leave endpoint null with serve")
        _require(self.endpoint is None or bool(self.endpoint.strip()), "endpoint", "must not be empty")
        _require(bool(self.model.strip()), "model", "name the judge model the endpoint serves")
        _require(self.api_key_env is None or _ENV_NAME.match(self.api_key_env) is not None, "api_key_env",
                 f"{self.api_key_env!r} is not an environment variable name (give the NAME of the variable "
                 "holding the key, never the key)")
        _require(len(self.benchmarks) >= 1, "benchmarks", f"list at least one of {', '.join(BENCHMARKS)}")
        _require(len(set(self.benchmarks)) == len(self.benchmarks), "benchmarks", "a benchmark is listed twice")
        _require(bool(self.data_dir), "data_dir", "must not be empty")
        _require(self.max_concurrency >= 1, "max_concurrency", "must be >= 1")
        _require(self.timeout_s > 0, "timeout_s", "must be > 0")
        _require(self.max_retries >= 0, "max_retries", "must be >= 0")
        _require(self.temperature >= 0, "temperature", "must be >= 0")
        _require(self.max_tokens >= 1, "max_tokens", "must be >= 1")
        _require(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        _require(self.limit is None or self.limit >= 1, "limit", "must be >= 1 (or null for every item)")
        _require(self.serve_timeout_s > 0, "serve_timeout_s", "must be > 0")

    def result_settings(self) -> dict:
        """The settings a judged number depends on (not where or how fast it was asked)."""
        return {"model": self.model, "benchmarks": sorted(self.benchmarks), "temperature": self.temperature,
                "max_tokens": self.max_tokens, "max_new_tokens": self.max_new_tokens, "limit": self.limit,
                "serve": self.serve}
