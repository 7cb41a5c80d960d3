"""The experiment config: one YAML file, every stage in it, every value with a working default.

`load_config(path, overrides)` returns an `ExperimentConfig`; any mistake is a `ConfigError`
whose message is `<file>: <key>: <why>`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from taxfree.errors import ConfigError, TaxfreeError
from taxfree.eval.judge.config import JudgeConfig
from taxfree.pipeline.schema import build_dataclass, nearest, to_dict

STAGE_ORDER = ["world", "pretrain", "sft", "rm", "sample", "align", "merge", "ama", "evaluate", "report"]


class _Fail(ConfigError):
    """Raised by `check()` with a key relative to its section."""


def _require(cond: bool, key: str, why: str) -> None:
    if not cond:
        raise _Fail(f"{key}: {why}")


@dataclass
class OptimizerConfig:
    """Which optimizer a training stage uses; names follow the online merging authors' code.

    Defaults are the authors' DPO settings (ALGORITHMS.md 1); with name adamw the merge
    fields are ignored.
    """

    name: Literal["adamw", "ondare", "onties"] = "adamw"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    reserve_p: float = 0.01
    alpha: float = 1e-7
    use_merge: bool = True
    rescale: bool = False
    online_step: int = 1
    clip_tau: float = 1.0
    # Models defining tau = ref - base; null = taken from the run (ref = SFT output, base = the
    # model SFT started from).
    ref: str | None = None
    base: str | None = None

    def check(self):
        _require(0.0 < self.reserve_p <= 1.0, "reserve_p", f"{self.reserve_p} is outside (0, 1]")
        _require(0.0 <= self.alpha <= 1.0, "alpha", f"{self.alpha} is outside [0, 1]")
        _require(self.online_step >= 1, "online_step", "must be >= 1")
        _require(self.weight_decay >= 0.0, "weight_decay", "must be >= 0")
        _require(self.eps > 0.0, "eps", "must be > 0")
        _require(all(0.0 <= b < 1.0 for b in self.betas), "betas", "each must be in [0, 1)")
        _require(self.clip_tau > 0.0, "clip_tau", "must be > 0")


@dataclass
class TrainConfig:
    """What every training stage shares; one Trainer run."""

    epochs: float = 1.0
    max_steps: int = -1
    lr: float = 1e-5
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr"] = "cosine"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    batch_size: int = 8
    eval_batch_size: int = 16
    grad_accum: int = 1
    max_length: int = 512
    # Over-long examples are cut (TRL keeps their start) unless false: then they are an error.
    truncation: bool = True
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    save_steps: int = 200
    save_total_limit: int = 2
    eval_steps: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    dataloader_workers: int = 0
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)

    def check(self):
        _require(self.lr > 0, "lr", "must be > 0")
        _require(self.batch_size >= 1, "batch_size", "must be >= 1")
        _require(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
        _require(self.grad_accum >= 1, "grad_accum", "must be >= 1")
        _require(self.max_length >= 8, "max_length", "must be >= 8")
        _require(self.epochs > 0 or self.max_steps > 0, "epochs", "must be > 0 (or set max_steps)")
        _require(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "must be in [0, 1)")
        _require(self.save_steps >= 1, "save_steps", "must be >= 1")
        _require(self.logging_steps >= 1, "logging_steps", "must be >= 1")


@dataclass
class TinyModelConfig:
    """Shape of the tiny Llama the tiny world pretrains (vocab size comes from its tokenizer)."""

    hidden_size: int = 64
    num_layers: int = 6
    num_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = False

    def check(self):
        _require(self.hidden_size % self.num_heads == 0, "hidden_size", "must be divisible by num_heads")
        _require(self.num_layers >= 1, "num_layers", "must be >= 1")


@dataclass
class PretrainConfig(TrainConfig):
    """Causal LM on the world's corpus (tiny world only): makes the `base` model."""

    epochs: float = 6.0
    lr: float = 3e-3
    warmup_ratio: float = 0.02
    batch_size: int = 32
    max_length: int = 64
    model: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class SFTStageConfig(TrainConfig):
    """Supervised fine-tuning with TRL's SFTTrainer, loss on responses only."""

    epochs: float = 2.0
    lr: float = 2e-5
    batch_size: int = 8
    max_length: int = 1024
    completion_only_loss: bool = True


@dataclass
class RMStageConfig(TrainConfig):
    """Reward model on preference pairs with TRL's RewardTrainer (Bradley-Terry)."""

    # null = the run's SFT model with a fresh scalar head; or any model directory / hub id that
    # loads as a sequence classifier (a different encoder, e.g. DeBERTa or MiniLM).
    backbone: str | None = None
    epochs: float = 1.0
    lr: float = 1e-5
    batch_size: int = 8
    max_length: int = 1024
    center_rewards_coefficient: float | None = None


@dataclass
class SampleStageConfig:
    """K completions per training prompt from a policy, scored by the reward model."""

    policy: str | None = None  # null = the run's SFT model
    # The scorer: null = the run's rm model; or any sequence classifier (a model id or directory),
    # e.g. a sentiment classifier for EXO's IMDB task, with reward_label naming the class whose
    # logit is the reward (by id2label name or index; null for a one-logit reward model).
    reward_model: str | None = None
    reward_label: str | None = None
    prompts: Literal["pref_train", "sft_train"] = "pref_train"
    num_completions: int = 4
    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 128
    max_prompts: int | None = None
    batch_size: int = 16
    score_batch_size: int = 16
    chunk_size: int = 64

    def check(self):
        _require(self.num_completions >= 2, "num_completions", "must be >= 2")
        _require(self.temperature > 0, "temperature", "must be > 0 (sampling)")
        _require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        _require(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        _require(self.batch_size >= 1 and self.score_batch_size >= 1, "batch_size", "must be >= 1")
        _require(self.chunk_size >= 1, "chunk_size", "must be >= 1")
        _require(self.max_prompts is None or self.max_prompts >= 1, "max_prompts", "must be >= 1")


def variant_name(method: str, optimizer: str) -> str:
    """The align variant of a method and an optimizer: its directory `align/<method>-<optimizer>/`."""
    return f"{method}-{optimizer}"


ALIGN_METHODS = ["dpo", "ipo", "hinge", "exo-pair", "kto", "kto-pair", "exo-pref", "exo-rw", "dpo-rw", "dpo-pref"]
OPTIMIZER_NAMES = ["adamw", "ondare", "onties"]


@dataclass
class AlignStageConfig(TrainConfig):
    """Preference alignment: every method x optimizer listed is one variant, one model."""

    methods: list[str] = field(default_factory=lambda: ["dpo"])
    optimizers: list[str] = field(default_factory=lambda: ["adamw"])
    epochs: float = 1.0
    lr: float = 1e-6
    warmup_ratio: float = 0.1
    batch_size: int = 8
    max_length: int = 1024
    max_prompt_length: int = 512
    beta: float = 0.1  # dpo, ipo, hinge, kto, kto-pair, exo-pair
    label_smoothing: float = 0.0  # dpo (conservative DPO)
    beta_pi: float = 0.1  # EXO / DPO-rw policy temperature
    beta_r: float = 0.1  # EXO / DPO-rw reward temperature
    pref_eps: float = 4.54e-5  # exo-pref / exo-pair label smoothing
    temperature: float = 1.0  # logit temperature of the K-way methods
    num_completions: int | None = None  # K for exo-rw / dpo-rw; null = all sampled
    # Where the pairwise methods' pairs come from: "data" = data.pref_train (human pairs);
    # "samples" = the sample stage's completions, two per prompt labelled by the reward (EXO's
    # pref setting on IMDB: an independent K = 2 draw, the higher reward chosen, ties dropped).
    pref_pairs: Literal["data", "samples"] = "data"
    precompute_ref_log_probs: bool = False

    def check(self):
        super().check()
        _require(len(self.methods) >= 1, "methods", "list at least one method")
        for m in self.methods:
            _require(m in ALIGN_METHODS, "methods", f"unknown method {m!r}{nearest(m, ALIGN_METHODS)}")
        _require(len(set(self.methods)) == len(self.methods), "methods", "a method is listed twice")
        _require(len(self.optimizers) >= 1, "optimizers", "list at least one optimizer")
        for o in self.optimizers:
            _require(o in OPTIMIZER_NAMES, "optimizers", f"unknown optimizer {o!r}{nearest(o, OPTIMIZER_NAMES)}")
        _require(len(set(self.optimizers)) == len(self.optimizers), "optimizers", "an optimizer is listed twice")
        for k in ("beta", "beta_pi", "beta_r"):
            _require(getattr(self, k) > 0, k, "must be > 0")
        _require(0 <= self.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)")
        _require(0 < self.pref_eps < 0.5, "pref_eps", "must be in (0, 0.5)")
        _require(self.temperature > 0, "temperature", "must be > 0")
        _require(self.max_prompt_length < self.max_length, "max_prompt_length", "must be < max_length")
        _require(self.num_completions is None or self.num_completions >= 2, "num_completions", "must be >= 2")


@dataclass
class PartwiseMergeConfig:
    """One partwise point: an aligned weight per decoder-layer range (ALGORITHMS.md 3)."""

    name: str | None = None  # the point is merge/<variant>-<name>; null = partwise<index>
    blocks: str = ""  # "0-1:0.8,2-3:0.5,4-:0.2" (inclusive ranges, FIRST-LAST:ALIGNED_WEIGHT)
    aligned_weight: float | None = None  # layers no range covers (null: every layer must be covered)
    embed_weight: float | None = None  # embeddings; null = aligned_weight
    head_weight: float | None = None  # final norm + LM head; null = aligned_weight

    def check(self):
        from taxfree.merging.plan import parse_blocks

        _require(bool(self.blocks.strip()), "blocks", 'give the layer ranges, e.g. "0-1:0.8,2-:0.4"')
        try:
            parse_blocks(self.blocks)
        except Exception as e:  # TaxfreeError from the parser, reworded for the config
            raise _Fail(f"blocks: {str(e).removeprefix('--blocks: ')}") from None
        for k in ("embed_weight", "head_weight"):
            _require(self.aligned_weight is not None or getattr(self, k) is not None, k,
                     "required when aligned_weight is null (nothing else says what it gets)")
        _require(self.name is None or (bool(self.name) and "/" not in self.name and not self.name.startswith(".")),
                 "name", "must be a plain directory name")


@dataclass
class MergeStageConfig:
    """Post-hoc averaging of the SFT model with each aligned variant: `(1 - w) * sft + w * aligned`.

    One output per point: `merge/<variant>-w<w>/` for each aligned weight, and
    `merge/<variant>-<name>/` for each partwise setting.
    """

    aligned: list[str] | None = None  # align variants to merge (e.g. dpo-adamw); null = every one
    aligned_weights: list[float] = field(default_factory=lambda: [0.2, 0.4, 0.6, 0.8])
    partwise: list[PartwiseMergeConfig] = field(default_factory=list)
    allow_extrapolation: bool = False  # allow weights outside [0, 1]
    max_shard_size: str = "5GB"

    def check(self):
        from taxfree.merging.checkpoint import parse_size

        _require(len(self.aligned_weights) + len(self.partwise) >= 1, "aligned_weights",
                 "list at least one aligned weight (or a partwise setting)")
        _require(len(set(self.aligned_weights)) == len(self.aligned_weights), "aligned_weights", "a weight is listed twice")
        for w in self.aligned_weights:
            _require(self.allow_extrapolation or 0.0 <= w <= 1.0, "aligned_weights",
                     f"{w} is outside [0, 1] (set allow_extrapolation: true to extrapolate)")
        for i, p in enumerate(self.partwise):
            for k in ("aligned_weight", "embed_weight", "head_weight"):
                v = getattr(p, k)
                _require(v is None or self.allow_extrapolation or 0.0 <= v <= 1.0, f"partwise[{i}].{k}",
                         f"{v} is outside [0, 1] (set allow_extrapolation: true to extrapolate)")
        names = self.point_names()
        _require(len(set(names)) == len(names), "partwise", "two partwise settings have the same name")
        _require(self.aligned is None or len(self.aligned) >= 1, "aligned", "list at least one variant (or null for all)")
        try:
            parse_size(self.max_shard_size)
        except Exception as e:
            raise _Fail(f"max_shard_size: {e}") from None

    def point_names(self) -> list[str]:
        return [f"partwise{i}" if p.name is None else p.name for i, p in enumerate(self.partwise)]


@dataclass
class AmaStageConfig:
    """Adaptive Model Averaging (ALGORITHMS.md 4): learned per-block aligned weights.

    One merged model per aligned variant, `ama/<variant>/`, trained on the collected data: the
    sample stage's best-of-K responses (`sample/collected.jsonl`) unless `data` names a file.
    """

    aligned: list[str] | None = None  # align variants (e.g. dpo-adamw); null = every one
    data: str | None = None  # sft-format JSONL; null = the run's sample/collected.jsonl
    # Whose best-of-K responses AMA learns on: "sample" = the sample stage's (its policy, the SFT
    # model by default); "aligned" = each aligned variant's own, as in the paper: the ama stage
    # samples them with the sample settings (prompts, K, temperature, reward model).
    collect_from: Literal["sample", "aligned"] = "sample"
    blocks: str = "block3"  # block3 (thirds), blockN, or layerwise
    head_block: bool = False  # the LM head as one more learned block (needs an untied head)
    sft_mean: float = 0.2  # mean SFT weight s0 (mean aligned weight 1 - s0)
    eps: float = 0.2
    reg: float = 1e-4
    reg_weighting: Literal["plain", "layer"] = "plain"
    embed_aligned_weight: float | None = None  # null = 1 - sft_mean
    head_aligned_weight: float | None = None  # null = 1 - sft_mean (ignored with head_block)
    lr: float = 4e-5  # the paper: 2e-5 after RSF, 4e-5 after PPO/DPO
    epochs: int = 1
    warmup_ratio: float = 0.03
    batch_size: int = 8
    max_length: int = 512
    max_examples: int | None = None  # null = all collected examples
    max_grad_norm: float | None = None
    save_steps: int = 50  # checkpoint the logits and optimizer state every N steps (resume after a kill)

    def check(self):
        import re

        _require(self.blocks == "layerwise" or re.fullmatch(r"block[1-9]\d*", self.blocks) is not None, "blocks",
                 f"{self.blocks!r}: expected block3, blockN (e.g. block4) or layerwise")
        _require(0.0 < self.sft_mean < 1.0, "sft_mean", "must be in (0, 1)")
        _require(self.eps >= 0.0, "eps", "must be >= 0")
        _require(self.reg >= 0.0, "reg", "must be >= 0")
        for k in ("embed_aligned_weight", "head_aligned_weight"):
            v = getattr(self, k)
            _require(v is None or 0.0 <= v <= 1.0, k, f"{v} is outside [0, 1]")
        _require(self.lr > 0, "lr", "must be > 0")
        _require(self.epochs >= 1, "epochs", "must be >= 1")
        _require(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "must be in [0, 1)")
        _require(self.batch_size >= 1, "batch_size", "must be >= 1")
        _require(self.max_length >= 8, "max_length", "must be >= 8")
        _require(self.max_examples is None or self.max_examples >= 1, "max_examples", "must be >= 1")
        _require(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "must be > 0")
        _require(self.save_steps >= 1, "save_steps", "must be >= 1")
        _require(self.aligned is None or len(self.aligned) >= 1, "aligned", "list at least one variant (or null for all)")
        _require(self.data is None or self.collect_from == "sample", "collect_from",
                 "aligned samples the aligned models itself; leave ama.data null with it")


@dataclass
class LocalTaskConfig:
    """A benchmark kept in a local JSONL file, scored by lm-eval like a public one
    (taxfree.eval.local_tasks has the record shapes). Name it in `evaluate.benchmarks`."""

    name: str = ""
    kind: Literal["multiple_choice", "exact_match"] = "multiple_choice"
    data: str = ""  # the test items
    fewshot: str | None = None  # few-shot examples (never drawn from the test items)
    num_fewshot: int = 0

    def check(self):
        _require(bool(re.match(r"^[A-Za-z][A-Za-z0-9_\-]*$", self.name)), "name",
                 "letters, digits, '_' or '-', starting with a letter")
        _require(bool(self.data), "data", "the JSONL file of the test items is required")
        _require(self.num_fewshot >= 0, "num_fewshot", "must be >= 0")
        _require(self.num_fewshot == 0 or self.fewshot is not None, "fewshot",
                 "num_fewshot > 0 needs a fewshot file (examples are never drawn from the test items)")


@dataclass
class EvaluateStageConfig:
    """Reward and alignment tax of every model the run made (ALGORITHMS.md 5).

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
        _require(self.models is None or len(self.models) >= 1, "models", "list at least one model (or null for all)")
        _require(self.max_prompts is None or self.max_prompts >= 1, "max_prompts", "must be >= 1")
        _require(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        _require(self.temperature > 0, "temperature", "must be > 0")
        _require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        for k in ("batch_size", "reward_batch_size", "pairrm_batch_size", "benchmark_batch_size"):
            _require(getattr(self, k) >= 1, k, "must be >= 1")
        _require(self.limit is None or self.limit >= 1, "limit", "must be >= 1 (or null for every item)")
        for b in self.benchmarks or []:
            _require(bool(b.strip()) and b.count(":") <= 1, "benchmarks", f"{b!r}: expected 'task', 'task:metric' or a suite name")
        _require(len(set(self.opencompass)) == len(self.opencompass), "opencompass", "a dataset is listed twice")
        names = [t.name for t in self.local_tasks]
        _require(len(set(names)) == len(names), "local_tasks", "two local tasks have the same name")


@dataclass
class ReportStageConfig:
    """The results table and the reward-vs-tax plot of the run (report.md, results.json, pareto.png)."""

    title: str | None = None  # null = "<name>: reward vs alignment tax"
    dpi: int = 150
    reward_axis: Literal["reward", "mt_bench", "alpaca_eval_lc", "alpaca_eval_wr"] = "reward"  # the plot's y axis

    def check(self):
        _require(30 <= self.dpi <= 600, "dpi", "must be in [30, 600]")


@dataclass
class TinyWorldConfig:
    """The offline tiny world (DESIGN.md "Worlds and presets"); see taxfree.data.tiny_world."""

    num_entities: int = 120
    corpus_repeats: int = 4
    max_operand: int = 20
    heldout_sum_fraction: float = 0.2
    sft_examples: int = 1500
    pref_pairs: int = 1500
    eval_prompts: int = 64
    eval_items: int = 200
    vocab_size: int = 512
    heldout_fraction: float = 0.05

    def check(self):
        _require(self.num_entities >= 8, "num_entities", "must be >= 8")
        _require(0.0 < self.heldout_fraction < 0.5, "heldout_fraction", "must be in (0, 0.5)")
        _require(0.0 < self.heldout_sum_fraction < 0.9, "heldout_sum_fraction", "must be in (0, 0.9)")
        _require(self.vocab_size >= 128, "vocab_size", "must be >= 128")


@dataclass
class WorldConfig:
    kind: Literal["tiny", "none"] = "tiny"
    tiny: TinyWorldConfig = field(default_factory=TinyWorldConfig)


@dataclass
class ModelsConfig:
    """Models the run starts from. null = made by a stage of this run (tiny world)."""

    base: str | None = None
    sft: str | None = None
    tokenizer: str | None = None
    trust_remote_code: bool = False
    # For tokenizers without one (base models, encoder reward backbones): `plain`, `chatml`, a
    # Jinja template or a .jinja file (taxfree.models.chat_templates). Tokenizers with their own keep it.
    chat_template: str | None = None


@dataclass
class DataConfig:
    """Data files (JSONL in the record formats of taxfree.data.records). null = from the world."""

    pretrain_train: str | None = None
    pretrain_eval: str | None = None
    sft_train: str | None = None
    sft_eval: str | None = None
    pref_train: str | None = None
    pref_eval: str | None = None
    eval_prompts: str | None = None


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    run_dir: str = "runs"
    stages: list[str] | None = None
    world: WorldConfig = field(default_factory=WorldConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTStageConfig = field(default_factory=SFTStageConfig)
    rm: RMStageConfig = field(default_factory=RMStageConfig)
    sample: SampleStageConfig = field(default_factory=SampleStageConfig)
    align: AlignStageConfig = field(default_factory=AlignStageConfig)
    merge: MergeStageConfig = field(default_factory=MergeStageConfig)
    ama: AmaStageConfig = field(default_factory=AmaStageConfig)
    evaluate: EvaluateStageConfig = field(default_factory=EvaluateStageConfig)
    report: ReportStageConfig = field(default_factory=ReportStageConfig)

    # Set by load_config, not by the YAML.
    source: str = field(default="<config>", repr=False)
    base_dir: str = field(default=".", repr=False)

    @property
    def root(self) -> Path:
        """runs/<name>: every output of this experiment lives below it."""
        return Path(self.run_dir) / self.name

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def enabled_stages(self) -> list[str]:
        if self.stages is not None:
            return list(self.stages)
        out = []
        for s in STAGE_ORDER:
            if s in ("world", "pretrain") and self.world.kind != "tiny":
                continue
            if s == "pretrain" and self.models.base is not None:
                continue
            if s == "sft" and self.models.sft is not None:
                continue
            if s not in IMPLEMENTED_STAGES:
                continue
            if s == "sample" and not self.needs_samples():
                continue
            out.append(s)
        return out

    def needs_samples(self) -> bool:
        """Reward-labelled samples feed exo-rw / dpo-rw, and AMA's collected data unless ama.data is given."""
        if any(m in ("exo-rw", "dpo-rw") for m in self.align.methods):
            return True
        if self.align.pref_pairs == "samples":
            return True
        return self.ama.data is None and self.ama.collect_from == "sample" and (self.stages is None or "ama" in self.stages)

    def align_variants(self, selected: list[str] | None = None) -> list[str]:
        """Names of the align stage's variants, `<method>-<optimizer>`; or `selected` (a stage's
        `aligned` list) when it is given."""
        if selected is not None:
            return list(selected)
        return [variant_name(m, o) for m in self.align.methods for o in self.align.optimizers]

    def section(self, stage: str) -> dict:
        obj = getattr(self, stage, None)
        if obj is None:
            return {}
        if stage == "world":
            return to_dict(self.world)
        return to_dict(obj)

    def to_dict(self) -> dict:
        d = to_dict(self)
        d.pop("source", None)
        d.pop("base_dir", None)
        return d


# Stages whose code exists; the CLI offers exactly these.
IMPLEMENTED_STAGES = ["world", "pretrain", "sft", "rm", "sample", "align", "merge", "ama", "evaluate", "report"]

_NOT_SECTIONS = {"source", "base_dir"}


def _apply_override(data: dict, assignment: str, source: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment}: expected section.key=value")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {assignment}: expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{source}: {key}: --set goes through {p!r}, which is not a section")
        node = nxt
    node[parts[-1]] = value


def _resolve_path(cfg: ExperimentConfig, value: str | None) -> str | None:
    """Config paths are relative to the directory the command runs in, `~` expanded."""
    if value is None:
        return None
    return os.path.expanduser(value)


def looks_like_hub_id(ref: str) -> bool:
    """`org/name` that is not a local path: resolved by transformers from the hub or its cache."""
    if ref.startswith((".", "/", "~")) or os.sep + os.sep in ref:
        return False
    parts = ref.split("/")
    return len(parts) == 2 and all(parts) and not Path(ref).exists()


def _check_paths(cfg: ExperimentConfig) -> None:
    src = cfg.source
    for key in dataclasses.fields(DataConfig):
        value = getattr(cfg.data, key.name)
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"{src}: data.{key.name}: file not found: {value}")
    for key in ("base", "sft", "tokenizer"):
        value = getattr(cfg.models, key)
        if value is None or looks_like_hub_id(value):
            continue
        p = Path(value)
        if not p.is_dir():
            raise ConfigError(f"{src}: models.{key}: model directory not found: {value}")
        if key != "tokenizer" and not (p / "config.json").is_file():
            raise ConfigError(f"{src}: models.{key}: {value} has no config.json (not a Hugging Face model directory)")
    for key, value in (("rm.backbone", cfg.rm.backbone), ("sample.policy", cfg.sample.policy),
                       ("sample.reward_model", cfg.sample.reward_model), ("evaluate.reward_model", cfg.evaluate.reward_model)):
        if value is not None and not looks_like_hub_id(value) and not (Path(value) / "config.json").is_file():
            raise ConfigError(f"{src}: {key}: model directory not found: {value}")
    for stage in ("pretrain", "sft", "align"):
        opt = getattr(cfg, stage).optimizer
        for key in ("ref", "base"):
            value = getattr(opt, key)
            if value is not None and not looks_like_hub_id(value) and not (Path(value) / "config.json").is_file():
                raise ConfigError(f"{src}: {stage}.optimizer.{key}: model directory not found: {value}")
    if cfg.ama.data is not None and not Path(cfg.ama.data).is_file():
        raise ConfigError(f"{src}: ama.data: file not found: {cfg.ama.data}")
    for i, task in enumerate(cfg.evaluate.local_tasks):
        for key in ("data", "fewshot"):
            value = getattr(task, key)
            if value is not None and not Path(value).is_file():
                raise ConfigError(f"{src}: evaluate.local_tasks[{i}].{key}: file not found: {value}")
    from taxfree.models.chat_templates import resolve_chat_template

    try:
        resolve_chat_template(cfg.models.chat_template)
    except TaxfreeError as e:
        raise ConfigError(f"{src}: models.chat_template: {e}") from None


def _check_consistency(cfg: ExperimentConfig) -> None:
    src = cfg.source
    if cfg.stages is not None:
        for s in cfg.stages:
            if s not in STAGE_ORDER:
                raise ConfigError(f"{src}: stages: unknown stage {s!r}{nearest(s, STAGE_ORDER)}")
            if s not in IMPLEMENTED_STAGES:
                raise ConfigError(f"{src}: stages: stage {s!r} is not available in this version")
    if cfg.world.kind != "tiny":
        if cfg.models.base is None and cfg.models.sft is None:
            raise ConfigError(f"{src}: models.base: required when world.kind is not 'tiny' (nothing pretrains a base model)")
        if cfg.models.sft is None and cfg.data.sft_train is None:
            raise ConfigError(f"{src}: data.sft_train: required to run sft when world.kind is not 'tiny'")
    for stage in ("sft",):
        opt = getattr(cfg, stage).optimizer
        if opt.name != "adamw" and (opt.ref is None or opt.base is None):
            missing = "ref" if opt.ref is None else "base"
            raise ConfigError(
                f"{src}: {stage}.optimizer.{missing}: {opt.name} in {stage} needs optimizer.ref and optimizer.base "
                "(tau = ref - base); the run provides them only to the align stage"
            )
    merging = [o for o in cfg.align.optimizers if o != "adamw"]
    if merging and "align" in cfg.enabled_stages() and cfg.world.kind != "tiny" and cfg.models.base is None \
            and cfg.align.optimizer.base is None:
        raise ConfigError(
            f"{src}: models.base: {merging[0]} needs the model SFT started from (tau = sft - base); set models.base"
        )
    variants = cfg.align_variants()
    for stage in ("merge", "ama"):
        for v in getattr(cfg, stage).aligned or []:
            if v not in variants:
                raise ConfigError(f"{src}: {stage}.aligned: {v!r} is not an align variant of this config"
                                  f"{nearest(v, variants)} (have: {', '.join(variants)})")
    if not cfg.name or "/" in cfg.name or "\\" in cfg.name or cfg.name in (".", "..") or any(ord(c) < 32 for c in cfg.name):
        raise ConfigError(f"{src}: name: must be a plain directory name, got {cfg.name!r}")


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> ExperimentConfig:
    """Parse and fully validate one experiment file; raises ConfigError, writes nothing."""
    source = str(path)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{source}: file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "yaml"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{source}: {where}: invalid YAML: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: not a UTF-8 text file") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level: expected a mapping of sections")
    data = copy.deepcopy(data)
    for k in _NOT_SECTIONS:
        if k in data:
            raise ConfigError(f"{source}: {k}: unknown key")
    for assignment in overrides or []:
        _apply_override(data, assignment, source)
    cfg = build_dataclass(ExperimentConfig, data, "", source)
    cfg.source = source
    cfg.base_dir = str(p.resolve().parent)
    for key in dataclasses.fields(DataConfig):
        setattr(cfg.data, key.name, _resolve_path(cfg, getattr(cfg.data, key.name)))
    for key in ("base", "sft", "tokenizer"):
        setattr(cfg.models, key, _resolve_path(cfg, getattr(cfg.models, key)))
    cfg.ama.data = _resolve_path(cfg, cfg.ama.data)
    for task in cfg.evaluate.local_tasks:
        task.data, task.fewshot = _resolve_path(cfg, task.data), _resolve_path(cfg, task.fewshot)
    _check_consistency(cfg)
    _check_paths(cfg)
    return cfg
