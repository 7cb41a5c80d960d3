"""`evaluate`: reward and alignment tax of every model the run made.

Models: the SFT model (the baseline of the tax), every align variant, every merge point and the
AMA model, found as finished stage directories (`stage.json` + `model/config.json`) below the
run's align / merge / ama directories, so models added by those stages are picked up without a
list here. A merge point or AMA model names the align variant it came from and its aligned
weight in its manifest (`aligned`, `aligned_weight` in its config or metrics); the report draws
merge sweeps from them.

Per model: greedy responses to the held-out prompts (`evaluate/<model-id>/responses.jsonl`),
their mean reward-model score, the tiny world's gold reward, the PairRM win rate against the SFT
model's responses (when `evaluate.pairrm` is set), and benchmarks through lm-eval (the tiny
world's knowledge / arithmetic items as local tasks) and OpenCompass, and with `evaluate.judge`
MT-Bench and AlpacaEval 2.0 from an OpenAI-compatible judge (taxfree.eval.judge: one session per
stage, checked before any model; its answers and judgements are cached in `evaluate/<model-id>/judge/`,
which a re-evaluation keeps). Each model's result is
cached in `evaluate/<model-id>/results.json` under a key of that model's own identity (its
manifest's run_id) and the evaluation settings, so a new align variant or merge point costs one
evaluation, not all of them. `evaluate/results.json` gathers the current models for the report.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from taxfree.atomic import atomic_write_json
from taxfree.data.records import read_jsonl, write_jsonl
from taxfree.data.tiny_world import gold_reward, world_files
from taxfree.errors import TaxfreeError, nearest
from taxfree.eval.judge.config import JudgeConfig
from taxfree.eval.suites import SUITES, BenchmarkTask, task_score
from taxfree.pipeline import manifest as mf
from taxfree.console import log
from taxfree.pipeline.paths import expand, is_model_ref
from taxfree.pipeline.resolve import data_source, sft_model_source, tokenizer_source, world_dir
from taxfree.pipeline.schema import require
from taxfree.pipeline.stages import Stage, model_stages


@dataclass
class LocalTaskConfig:
    """A benchmark kept in a local JSONL file, scored by lm-eval like a public one
    (taxfree.eval.local_tasks has the record shapes). Name it in `evaluate.benchmarks`."""

    name: str = ""
    kind: Literal["multiple_choice", "exact_match"] = "multiple_choice"
    data: str = ""  # the test items
    fewshot: str | None = None  # few-shot examples (never drawn from the test items)
    num_fewshot: int = 0

    def __post_init__(self):
        self.data, self.fewshot = expand(self.data), expand(self.fewshot)

    def check(self):
        require(bool(re.match(r"^[A-Za-z][A-Za-z0-9_\-]*$", self.name)), "name",
                 "letters, digits, '_' or '-', starting with a letter")
        require(bool(self.data), "data", "the JSONL file of the test items is required")
        require(self.num_fewshot >= 0, "num_fewshot", "must be >= 0")
        require(self.num_fewshot == 0 or self.fewshot is not None, "fewshot",
                 "num_fewshot > 0 needs a fewshot file (examples are never drawn from the test items)")
        for key in ("data", "fewshot"):
            value = getattr(self, key)
            require(value is None or Path(value).is_file(), key, f"file not found: {value}")


@dataclass
class EvaluateStageConfig:
    """Reward and alignment tax of every model the run made (docs/algorithms.md 5).

    Reward: mean reward-model score of each model's responses to the held-out prompts
    (greedy unless `do_sample`). Tax: drop of the benchmark average relative to the SFT model.
    """

    # null = every model the run produced (sft, align/<variant>, merge/<point>, ama); or a list
    # of those ids. The SFT model is always evaluated: it is the baseline of the tax.
    models: list[str] | None = None
    max_prompts: int | None = None  # null = every held-out prompt
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0  # only with do_sample
    top_p: float = 1.0  # only with do_sample
    batch_size: int = 16  # generation
    reward_model: str | None = None  # null = the run's rm stage model
    reward_label: str | None = None  # a classifier's class whose logit is the reward (see sample)
    reward_batch_size: int = 16
    pairrm: str | None = None  # null = off; a PairRM-hf directory or hub id
    pairrm_batch_size: int = 8
    # lm-eval task names ("task" or "task:metric"), suite names (taxfree.eval.SUITES) or names
    # of local_tasks; null = the tiny world's tasks (tiny_knowledge, tiny_arithmetic) and every
    # local task.
    benchmarks: list[str] | None = None
    local_tasks: list[LocalTaskConfig] = field(default_factory=list)
    limit: int | None = None  # items per benchmark; null = all
    benchmark_batch_size: int = 16
    opencompass: list[str] = field(default_factory=list)  # OpenCompass datasets (math401, ds1000)
    opencompass_data_dir: str | None = None
    # HumanEval / MBPP run model-written code: only in a sandbox, and only when asked.
    allow_code_execution: bool = False
    judge: JudgeConfig | None = None  # MT-Bench / AlpacaEval 2.0 through a judge (taxfree.eval.judge); null = off

    def check(self):
        require(self.models is None or len(self.models) >= 1, "models", "list at least one model (or null for all)")
        require(self.max_prompts is None or self.max_prompts >= 1, "max_prompts", "must be >= 1")
        require(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        require(self.temperature > 0, "temperature", "must be > 0")
        require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        for k in ("batch_size", "reward_batch_size", "pairrm_batch_size", "benchmark_batch_size"):
            require(getattr(self, k) >= 1, k, "must be >= 1")
        require(self.limit is None or self.limit >= 1, "limit", "must be >= 1 (or null for every item)")
        for b in self.benchmarks or []:
            require(bool(b.strip()) and b.count(":") <= 1, "benchmarks", f"{b!r}: expected 'task', 'task:metric' or a suite name")
        require(len(set(self.opencompass)) == len(self.opencompass), "opencompass", "a dataset is listed twice")
        names = [t.name for t in self.local_tasks]
        require(len(set(names)) == len(names), "local_tasks", "two local tasks have the same name")
        require(is_model_ref(self.reward_model), "reward_model", f"model directory not found: {self.reward_model}")

TINY_TASKS = {"tiny_knowledge": "knowledge_items", "tiny_arithmetic": "arithmetic_items"}
_PERCENT_METRICS = ("bleu", "chrf", "ter")  # lm-eval reports these 0-100 already
_TASKS_DIR = "lm_eval_tasks"
_OPENCOMPASS_DIR = "opencompass"


@dataclass
class EvalModel:
    id: str  # path below the run directory: sft, align/dpo-adamw, merge/<point>, ama
    kind: str  # sft | align | merge | ama
    path: str
    identity: dict  # what makes this model this model: its manifest run_id or its files' hash
    aligned: str | None = None  # the align variant it belongs to
    aligned_weight: float | None = None
    merge_mode: str | None = None  # linear | partwise, for merge points


def reward_model_source(cfg):
    if cfg.evaluate.reward_model is not None:
        return None, cfg.evaluate.reward_model
    return "rm", str(cfg.stage_dir("rm") / "model")


def inputs(cfg) -> dict:
    out = {
        "sft": sft_model_source(cfg),
        "tokenizer": tokenizer_source(cfg),
        "prompts": data_source(cfg, "eval_prompts"),
        "reward_model": reward_model_source(cfg),
    }
    for stage in finished_model_stages(cfg):
        out[stage] = (stage, str(cfg.stage_dir(stage)))
    if cfg.evaluate.pairrm is not None:
        out["pairrm"] = (None, cfg.evaluate.pairrm)
    if cfg.world.kind == "tiny":
        out["tasks"] = ("world", str(world_files(world_dir(cfg)).knowledge_items))
    for t in cfg.evaluate.local_tasks:  # their items are inputs: an edited file re-evaluates
        out[f"task:{t.name}"] = (None, t.data)
        if t.fewshot is not None:
            out[f"task:{t.name}:fewshot"] = (None, t.fewshot)
    if cfg.evaluate.judge is not None:  # MT-Bench / AlpacaEval data files
        from taxfree.eval.judge import judge_inputs

        out.update(judge_inputs(cfg.evaluate.judge))
    return out


def preflight(cfg) -> None:
    """Model ids name directories below the run (`evaluate/<id>/` is written): they cannot leave it.
    The benchmark list is checked here too, before any stage runs."""
    for mid in cfg.evaluate.models or []:
        parts = mid.split("/")
        if mid.startswith("/") or "\\" in mid or any(p in ("", ".", "..") for p in parts) \
                or parts[0] not in ("sft", *model_stages()) or (parts[0] == "sft") != (len(parts) == 1):
            raise TaxfreeError(f"{cfg.source}: evaluate.models: {mid!r} is not a model id of a run "
                               "(sft, align/<variant>, merge/<point>, ama/<variant>)")
    benchmark_tasks(cfg)
    if cfg.evaluate.judge is not None:  # variables, data files, serve setup: before any stage runs
        from taxfree.eval.judge import preflight as judge_preflight

        judge_preflight(cfg.evaluate.judge, cfg.source)


def finished_model_stages(cfg) -> list[str]:
    """The enabled model-making stages evaluate reads: align always (it must have finished), merge
    and ama once they have a result. A run of a subset (`--stages sft,align,evaluate`) evaluates
    what exists; running merge or ama later changes evaluate's key, and only their new models
    are evaluated then (the others are cached)."""
    enabled = cfg.enabled_stages()
    return [s for s in model_stages() if s in enabled and (s == "align" or mf.read_manifest(cfg.stage_dir(s)) is not None)]


def section(cfg) -> dict:
    return {"evaluate": dataclasses.asdict(cfg.evaluate), "seed": cfg.seed,
            "trust_remote_code": cfg.models.trust_remote_code}


# -- which models ---------------------------------------------------------------------------

def _lookup(manifest: dict, key: str):
    """A value the producing stage recorded: in its config, its metrics, or one level below."""
    places = [manifest, manifest.get("config") or {}, manifest.get("metrics") or {}]
    places += [v for v in (manifest.get("config") or {}).values() if isinstance(v, dict)]
    for place in places:
        if isinstance(place, dict) and place.get(key) is not None:
            return place[key]
    return None


def run_models(cfg, ctx_inputs: dict) -> list[EvalModel]:
    """The SFT model first, then every finished model of the enabled model-making stages."""
    _, sft_path = sft_model_source(cfg)
    models = [EvalModel("sft", "sft", sft_path, ctx_inputs["sft"], aligned_weight=0.0)]
    align_paths: dict[str, str] = {}
    for stage in model_stages():
        if stage not in ctx_inputs:
            continue
        sdir = cfg.stage_dir(stage)
        for man_path in sorted(sdir.rglob(mf.MANIFEST)):
            d = man_path.parent
            rel = d.relative_to(sdir).parts
            if "checkpoints" in rel or any(p.startswith(".") for p in rel) or not (d / "model" / "config.json").is_file():
                continue
            m = mf.read_manifest(d)
            if m is None:
                continue
            mid = d.relative_to(cfg.root).as_posix()
            model = EvalModel(mid, stage, str(d / "model"), {"run_id": m.get("run_id")})
            if stage == "align":
                model.aligned, model.aligned_weight = d.name, 1.0
                align_paths[str((d / "model").resolve())] = d.name
            else:
                aligned = _lookup(m, "aligned") or _lookup(m, "aligned_variant")
                if isinstance(aligned, str):  # a variant name, or the path of an aligned model
                    aligned = align_paths.get(str(Path(aligned).resolve()), aligned)
                model.aligned = aligned if isinstance(aligned, str) else None
                w = _lookup(m, "aligned_weight")
                model.aligned_weight = float(w) if isinstance(w, (int, float)) and not isinstance(w, bool) else None
                mode = _lookup(m, "mode")
                model.merge_mode = mode if stage == "merge" and isinstance(mode, str) else None
            models.append(model)
    wanted = cfg.evaluate.models
    if wanted is not None:
        ids = [m.id for m in models]
        for w in wanted:
            if w not in ids:
                raise TaxfreeError(f"{cfg.source}: evaluate.models: {w!r} is not a model of this run{nearest(w, ids)} "
                                   f"(have: {', '.join(ids)})")
        models = [m for m in models if m.id == "sft" or m.id in wanted]
    return models


# -- which benchmarks -----------------------------------------------------------------------

def benchmark_tasks(cfg) -> list[BenchmarkTask]:
    """Suites expanded, `task:metric` split, OpenCompass datasets appended; each task once."""
    names = cfg.evaluate.benchmarks
    local = {t.name: t for t in cfg.evaluate.local_tasks}
    if names is None:
        names = (list(TINY_TASKS) if cfg.world.kind == "tiny" else []) + list(local)
    tasks: list[BenchmarkTask] = []
    for name in names:
        if name in SUITES:
            tasks.extend(SUITES[name].tasks)
            continue
        task, _, metric = name.partition(":")
        if task in TINY_TASKS and cfg.world.kind != "tiny":
            raise TaxfreeError(f"{cfg.source}: evaluate.benchmarks: {task} exists only in the tiny world")
        if task in local and not metric:
            metric = "acc" if local[task].kind == "multiple_choice" else "exact_match"
        metric = metric or ("acc" if task in TINY_TASKS else "")
        tasks.append(BenchmarkTask(task.strip(), metric.strip(), to_percent=1.0 if metric in _PERCENT_METRICS else 100.0,
                                   executes_code=_runs_code(task.strip())))
    for ds in cfg.evaluate.opencompass:
        tasks.append(BenchmarkTask(ds, "accuracy", runner="opencompass", to_percent=1.0, executes_code=_runs_code(ds)))
    seen, out = set(), []
    for t in tasks:
        if t.task not in seen:
            seen.add(t.task)
            out.append(t)
    code = [t.task for t in out if t.executes_code]
    if code and not cfg.evaluate.allow_code_execution:
        raise TaxfreeError(f"{cfg.source}: evaluate.benchmarks: {', '.join(code)} run model-written code: "
                           "set evaluate.allow_code_execution: true (and run in a sandbox), or leave them out")
    return out


def _runs_code(task: str) -> bool:
    """A task named on its own (not through a suite) that executes model-written code."""
    known = {t.task for suite in SUITES.values() for t in suite.tasks if t.executes_code}
    return task in known or task.startswith(("humaneval", "mbpp"))


def counted_metric(task: BenchmarkTask, results: dict) -> BenchmarkTask:
    """A task named without a metric counts `acc`, else `exact_match`, else its first metric."""
    if task.metric:
        return task
    metrics = results.get(task.task, {})
    for m in ("acc", "exact_match", *sorted(metrics)):
        if m in metrics:
            return dataclasses.replace(task, metric=m, to_percent=1.0 if m in _PERCENT_METRICS else 100.0)
    raise TaxfreeError(f"benchmark {task.task}: lm-eval returned no metric")


# -- evaluating one model -------------------------------------------------------------------

class _Shared:
    """What every model's evaluation reuses, loaded once and only when needed."""

    def __init__(self, ctx, tasks: list[BenchmarkTask]):
        self.ctx, self.cfg, self.sec = ctx, ctx.cfg, ctx.cfg.evaluate
        self.tasks = tasks
        self.trust = self.cfg.models.trust_remote_code
        _, prompts_path = data_source(self.cfg, "eval_prompts")
        if prompts_path is None:
            raise TaxfreeError(f"{self.cfg.source}: data.eval_prompts: required by the evaluate stage "
                               "(held-out prompts, records with a 'prompt')")
        records = read_jsonl(prompts_path, "prompt")
        if self.sec.max_prompts is not None:
            records = records[: self.sec.max_prompts]
        self.prompts = [r["prompt"] for r in records]
        self._rm = self._pairrm = self._include = None
        self.judge = None  # a taxfree.eval.judge.JudgeSession when evaluate.judge is set

    def reward_model(self):
        if self._rm is None:
            from taxfree.eval.reward import load_reward_model

            _, path = reward_model_source(self.cfg)
            self._rm = load_reward_model(path, self.sec.reward_label, self.trust)
        return self._rm

    def pairrm(self):
        if self._pairrm is None:
            import torch

            from taxfree.eval.pairrm import PairRM

            self._pairrm = PairRM.from_pretrained(self.sec.pairrm, device="cuda" if torch.cuda.is_available() else "cpu")
        return self._pairrm

    def include_path(self) -> str | None:
        """The tiny world's items as lm-eval local tasks, written once per stage run."""
        configured = {t.name: t for t in self.sec.local_tasks}
        local = [t.task for t in self.tasks if t.task in TINY_TASKS or t.task in configured]
        if not local:
            return None
        if self._include is None:
            from taxfree.eval.local_tasks import LocalTaskSpec, write_local_tasks

            specs = []
            for name in local:
                if name in configured:
                    c = configured[name]
                    specs.append(LocalTaskSpec(name, c.kind, c.data, num_fewshot=c.num_fewshot, fewshot_path=c.fewshot))
                else:
                    files = world_files(world_dir(self.cfg))
                    specs.append(LocalTaskSpec(name, "multiple_choice", getattr(files, TINY_TASKS[name])))
            self._include = write_local_tasks(self.ctx.dir / _TASKS_DIR, specs)
        return self._include


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _run_lm_eval_tasks(model, tokenizer, tasks: list[BenchmarkTask], shared: _Shared) -> dict:
    from taxfree.eval.lm_eval_runner import run_lm_eval

    results: dict = {}
    groups: dict = {}
    for t in tasks:  # run_lm_eval takes one few-shot count per call
        groups.setdefault(t.num_fewshot, []).append(t.task)
    for fewshot, names in groups.items():
        results.update(run_lm_eval(model, tokenizer, names, include_path=shared.include_path(), limit=shared.sec.limit,
                                   num_fewshot=fewshot, batch_size=shared.sec.benchmark_batch_size,
                                   device=str(next(model.parameters()).device),
                                   allow_code_execution=shared.sec.allow_code_execution))
    return results


def _run_opencompass(m: EvalModel, tasks: list[BenchmarkTask], shared: _Shared, mdir: Path) -> dict:
    from taxfree.eval.opencompass import OpenCompassModel, run_opencompass, transformers4_view, write_opencompass_config

    work = mdir / _OPENCOMPASS_DIR
    view = transformers4_view(m.path, work / "model")
    abbr = m.id.replace("/", "_")
    config = write_opencompass_config(work / "config.py", [OpenCompassModel(abbr, str(view))], [t.task for t in tasks])
    scores = run_opencompass(config, work / "runs", data_dir=shared.sec.opencompass_data_dir)
    return scores.get(abbr, {})


def evaluate_model(m: EvalModel, shared: _Shared, mdir: Path, sft_responses: list[str] | None) -> dict:
    """Every number of one model; its responses go to `mdir/responses.jsonl`."""
    from tqdm.auto import tqdm

    from taxfree.eval.generation import generate_responses
    from taxfree.eval.pairrm import win_rate
    from taxfree.eval.reward import score_with_reward_model
    from taxfree.models.load import load_causal_lm, load_tokenizer

    import torch

    cfg, sec = shared.cfg, shared.sec
    lm_tasks = [t for t in shared.tasks if t.runner == "lm_eval"]
    oc_tasks = [t for t in shared.tasks if t.runner == "opencompass"]
    steps = ["generate", "reward"] + (["pairrm"] if sec.pairrm else []) + (["benchmarks"] if lm_tasks else []) \
        + (["opencompass"] if oc_tasks else []) + (["judge"] if shared.judge is not None else [])
    bar = tqdm(total=len(steps), desc=f"evaluate {m.id}", unit="step")

    def step(name):
        bar.set_postfix_str(name)

    _, tok_path = tokenizer_source(cfg)
    tokenizer = load_tokenizer(tok_path, trust_remote_code=shared.trust)
    model = load_causal_lm(m.path, trust_remote_code=shared.trust).eval()
    if torch.cuda.is_available():
        model = model.to("cuda")
    row = {"id": m.id, "kind": m.kind, "path": m.path, "aligned": m.aligned, "aligned_weight": m.aligned_weight,
           "merge_mode": m.merge_mode,
           "reward": None, "gold_reward": None, "pairrm_win_rate": None, "benchmarks": {}, "scores": {}}

    step("generate")
    responses = generate_responses(model, tokenizer, shared.prompts, max_new_tokens=sec.max_new_tokens,
                                   batch_size=sec.batch_size, do_sample=sec.do_sample, temperature=sec.temperature,
                                   top_p=sec.top_p, seed=cfg.seed, desc=f"{m.id}: generating responses")
    bar.update()
    step("reward")
    rm, rm_tok, label = shared.reward_model()
    rewards = score_with_reward_model(rm, rm_tok, shared.prompts, responses, batch_size=sec.reward_batch_size,
                                      label=label)
    row["reward"] = _mean(rewards)
    golds = [gold_reward(r) for r in responses] if cfg.world.kind == "tiny" else None
    if golds is not None:
        row["gold_reward"] = _mean(golds)
    bar.update()
    if sec.pairrm:
        step("pairrm")
        baseline = responses if sft_responses is None else sft_responses
        row["pairrm_win_rate"] = win_rate(shared.pairrm(), shared.prompts, responses, baseline,
                                          batch_size=sec.pairrm_batch_size)
        bar.update()
    lines = [{"prompt": p, "response": r, "reward": s, **({"gold_reward": g} if golds else {})}
             for p, r, s, g in zip(shared.prompts, responses, rewards, golds or [None] * len(responses))]
    write_jsonl(mdir / "responses.jsonl", lines)

    results: dict = {}
    if lm_tasks:
        step("benchmarks")
        results.update(_run_lm_eval_tasks(model, tokenizer, lm_tasks, shared))
        bar.update()
    if oc_tasks:
        step("opencompass")
        results.update(_run_opencompass(m, oc_tasks, shared, mdir))
        bar.update()
    if shared.judge is not None:
        step("judge")
        row.update(shared.judge.score(model, tokenizer, m.identity, mdir))
        bar.update()
    bar.close()
    row["benchmarks"] = results
    counted = [counted_metric(t, results) for t in shared.tasks]
    row["scores"] = {t.task: task_score(t, results) for t in counted}
    row["counted_metrics"] = {t.task: t.metric for t in counted}
    row["prompts"] = len(shared.prompts)
    del model
    return row


# -- the stage ------------------------------------------------------------------------------

def model_key(m: EvalModel, ctx, baseline: EvalModel) -> str:
    """Changes when this model, the shared inputs (prompts, reward model, ...) or the settings change."""
    shared = {k: v for k, v in ctx.inputs.items() if k not in ("sft", *model_stages())}
    settings = section(ctx.cfg)
    settings["evaluate"] = {k: v for k, v in settings["evaluate"].items() if k != "models"}
    if ctx.cfg.evaluate.judge is not None:  # not the endpoint or concurrency: what the judged numbers depend on
        settings["evaluate"]["judge"] = ctx.cfg.evaluate.judge.result_settings()
    key = {"model": m.identity, "shared": shared, "settings": settings}
    if ctx.cfg.evaluate.pairrm is not None:
        key["baseline"] = baseline.identity  # win rates are against the SFT model's responses
    return mf.hash_obj(key)


def _clear_model_dir(mdir: Path) -> None:
    """Empty a model's directory for a new evaluation, keeping the judge's cache (judge/): its
    answers and judgements are keyed by what they depend on, so they stay valid."""
    from taxfree.eval.judge import JUDGE_DIR

    if mdir.exists():
        for p in mdir.iterdir():
            if p.name == JUDGE_DIR and p.is_dir():
                continue
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    mdir.mkdir(parents=True, exist_ok=True)


def _remove_stale(ctx, current: set[str]) -> None:
    for res in sorted(ctx.dir.rglob("results.json")):
        d = res.parent
        if d == ctx.dir:
            continue
        try:  # only our per-model files (OpenCompass writes json of its own below a model's dir)
            mid = json.loads(res.read_text(encoding="utf-8")).get("model_id")
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
        if mid is not None and mid not in current and d.relative_to(ctx.dir).as_posix() == mid and d.exists():
            log(f"evaluate/{mid}: no longer a model of the run, removed")
            shutil.rmtree(d)


def run(ctx) -> dict:
    from taxfree.eval.judge import open_judge

    cfg = ctx.cfg
    with open_judge(cfg.evaluate.judge, ctx.dir, source=cfg.source, batch_size=cfg.evaluate.batch_size,
                    seed=cfg.seed) as judge:  # a remote judge is checked here, before any model
        return _run(ctx, judge)


def _run(ctx, judge) -> dict:
    from taxfree.eval.report import build_report

    cfg = ctx.cfg
    missing = [s for s in model_stages() if s in cfg.enabled_stages() and s not in ctx.inputs]
    if missing:
        log(f"evaluate: {', '.join(missing)} has not run; its models are not evaluated (run it, then evaluate again)")
    tasks = benchmark_tasks(cfg)
    models = run_models(cfg, ctx.inputs)
    shared = _Shared(ctx, tasks)
    shared.judge = judge
    rows, evaluated = [], []
    sft_responses = None
    for m in models:
        mdir = ctx.dir / m.id
        key = model_key(m, ctx, models[0])
        cached = None
        if (mdir / "results.json").is_file() and not ctx.force:
            try:
                cached = json.loads((mdir / "results.json").read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                cached = None
        if cached is not None and cached.get("key") == key and (mdir / "responses.jsonl").is_file():
            log(f"evaluate/{m.id}: up to date")
            row = cached["result"]
        else:
            _clear_model_dir(mdir)
            log(f"evaluate/{m.id}: evaluating {m.path}")
            row = evaluate_model(m, shared, mdir, sft_responses)
            atomic_write_json(mdir / "results.json", {"key": key, "model_id": m.id, "result": row})
            evaluated.append(m.id)
        if m.id == "sft" and cfg.evaluate.pairrm is not None:
            sft_responses = [r["response"] for r in read_jsonl(mdir / "responses.jsonl")]
        rows.append(row)
    _remove_stale(ctx, {m.id for m in models})

    sec = cfg.evaluate
    results = {
        "experiment": cfg.name,
        "seed": cfg.seed,
        "baseline": "sft",
        "reward_model": reward_model_source(cfg)[1],
        "pairrm": sec.pairrm,
        "generation": {"do_sample": sec.do_sample, "max_new_tokens": sec.max_new_tokens, "prompts": len(shared.prompts),
                       **({"temperature": sec.temperature, "top_p": sec.top_p} if sec.do_sample else {})},
        "benchmarks": [{"task": t.task, "metric": rows[0].get("counted_metrics", {}).get(t.task, t.metric),
                        "runner": t.runner} for t in tasks],
        "evaluated_this_run": evaluated,
        "models": rows,
    }
    atomic_write_json(ctx.dir / "results.json", results)
    report = build_report(results)
    metrics: dict = {"models": len(rows), "evaluated": len(evaluated)}
    for r in report["models"]:
        for k in ("reward", "gold_reward", "pairrm_win_rate", "benchmark_average", "tax_average", "mt_bench",
                  "alpaca_eval_lc", "alpaca_eval_wr"):
            if isinstance(r.get(k), (int, float)):
                metrics[f"{r['id']}/{k}"] = r[k]
    return metrics


STAGE = Stage(
    name="evaluate",
    help="reward, PairRM and benchmarks for every model the run made",
    config=EvaluateStageConfig,
    inputs=inputs,
    section=section,
    run=run,
    preflight=preflight,
    checkpoints={"sft": "causal_lm", "reward_model": "classifier"},
    # The per-model results live in subdirectories; the runner must not wipe them on a re-run.
    keeps_variants=True,
)

