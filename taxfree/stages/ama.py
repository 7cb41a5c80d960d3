"""`ama`: Adaptive Model Averaging of the SFT model with each aligned variant (docs/algorithms.md 4).

Per align variant (or those `ama.aligned` lists): the per-block mixing logits are trained on
the collected data (the sample stage's best-of-K responses, `ama.data`, or with
`ama.collect_from: aligned` the variant's own best-of-K responses, as in the paper) with both models
frozen, then the merged model is written to `ama/<variant>/model/` with `ama_weights.json`
(per-block SFT and aligned weights, also copied to `ama/<variant>/`). The logits and AdamW's
state are checkpointed every `save_steps` steps, so a killed run resumes where it stopped. The
maths lives in taxfree.merging (AdaptiveModelAverager, train_ama, lm_batches).
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from taxfree.data.records import read_jsonl
from taxfree.errors import TaxfreeError
from taxfree.pipeline.paths import expand
from taxfree.pipeline.resolve import sft_model_source, tokenizer_source
from taxfree.pipeline.rundir import run_variants
from taxfree.pipeline.schema import require
from taxfree.pipeline.stages import Stage
from taxfree.stages.align import variant_names
from taxfree.stages.merge import aligned_model, aligned_model_dir, check_aligned


@dataclass
class AmaStageConfig:
    """Adaptive Model Averaging (docs/algorithms.md 4): learned per-block aligned weights.

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

    def __post_init__(self):
        self.data = expand(self.data)

    def check(self):
        require(self.blocks == "layerwise" or re.fullmatch(r"block[1-9]\d*", self.blocks) is not None, "blocks",
                 f"{self.blocks!r}: expected block3, blockN (e.g. block4) or layerwise")
        require(0.0 < self.sft_mean < 1.0, "sft_mean", "must be in (0, 1)")
        require(self.eps >= 0.0, "eps", "must be >= 0")
        require(self.reg >= 0.0, "reg", "must be >= 0")
        for k in ("embed_aligned_weight", "head_aligned_weight"):
            v = getattr(self, k)
            require(v is None or 0.0 <= v <= 1.0, k, f"{v} is outside [0, 1]")
        require(self.lr > 0, "lr", "must be > 0")
        require(self.epochs >= 1, "epochs", "must be >= 1")
        require(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "must be in [0, 1)")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(self.max_length >= 8, "max_length", "must be >= 8")
        require(self.max_examples is None or self.max_examples >= 1, "max_examples", "must be >= 1")
        require(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "must be > 0")
        require(self.save_steps >= 1, "save_steps", "must be >= 1")
        require(self.aligned is None or len(self.aligned) >= 1, "aligned", "list at least one variant (or null for all)")
        require(self.data is None or self.collect_from == "sample", "collect_from",
                 "aligned samples the aligned models itself; leave ama.data null with it")
        require(self.data is None or Path(self.data).is_file(), "data", f"file not found: {self.data}")
STATE_NAME = "ama_state.safetensors"


COLLECTED = "collected.jsonl"  # with collect_from: aligned, the variant's own best-of-K data
SAMPLES = "samples.jsonl"  # ... and every sample it was chosen from, with its reward


def data_source(cfg) -> tuple[str | None, str]:
    if cfg.ama.data is not None:
        return None, cfg.ama.data
    return "sample", str(cfg.stage_dir("sample") / "collected.jsonl")


def inputs(cfg) -> dict:
    out = {"sft": sft_model_source(cfg), "tokenizer": tokenizer_source(cfg), "align": ("align", str(cfg.stage_dir("align")))}
    if cfg.ama.collect_from == "aligned":
        from taxfree.pipeline.resolve import data_source as file_source
        from taxfree.stages.sample import reward_model_source

        out.update(prompts=file_source(cfg, cfg.sample.prompts), reward_model=reward_model_source(cfg))
    else:
        out["data"] = data_source(cfg)
    return out


def section(cfg) -> dict:
    out = {"ama": dataclasses.asdict(cfg.ama), "seed": cfg.seed, "trust_remote_code": cfg.models.trust_remote_code}
    if cfg.ama.collect_from == "aligned":  # how the aligned models are sampled shapes the data
        out["sample"] = dataclasses.asdict(cfg.sample)
    return out


def collect_from_aligned(cfg, aligned_path: str, vdir) -> str:
    """Best-of-K responses of the aligned model itself (the paper's collected data), sampled and
    scored with the sample settings; written once to `vdir/collected.jsonl` (a re-run after a kill
    reuses it) with every sample in `vdir/samples.jsonl`."""
    from taxfree.data.records import write_jsonl
    from taxfree.models.load import load_causal_lm, load_tokenizer
    from taxfree.stages.sample import best_of_k, chunk_seed, load_reward_scorer, sample_and_score, sample_prompts

    path = vdir / COLLECTED
    if path.is_file():
        return str(path)
    trust = cfg.models.trust_remote_code
    _, tok_path = tokenizer_source(cfg)
    tokenizer = load_tokenizer(tok_path, trust_remote_code=trust)
    policy = load_causal_lm(aligned_path, trust_remote_code=trust).eval()
    records = sample_and_score(policy, tokenizer, sample_prompts(cfg), load_reward_scorer(cfg), cfg.sample,
                               chunk_seed(cfg.seed, 0))
    write_jsonl(vdir / SAMPLES, records, kind="rw")
    write_jsonl(path, best_of_k(records), kind="sft")  # last: its presence means both are complete
    return str(path)


def variant_config(cfg, variant: str) -> dict:
    _, run_id = aligned_model(cfg, variant)
    sec = dataclasses.asdict(cfg.ama)
    sec.pop("aligned")
    out = {"aligned": variant, "aligned_run_id": run_id, "ama": sec, "seed": cfg.seed,
           "trust_remote_code": cfg.models.trust_remote_code}
    if cfg.ama.collect_from == "aligned":
        out["sample"] = dataclasses.asdict(cfg.sample)
    return out


def train_variant(cfg, variant: str, vdir) -> dict:
    import torch
    from torch.utils.tensorboard import SummaryWriter

    from taxfree.merging import AdaptiveModelAverager
    from taxfree.merging.ama import WEIGHTS_NAME
    from taxfree.merging.ama_data import lm_batches
    from taxfree.merging.ama_training import train_ama
    from taxfree.models.load import load_causal_lm, load_tokenizer

    sec, trust = cfg.ama, cfg.models.trust_remote_code
    _, sft_path = sft_model_source(cfg)
    _, tok_path = tokenizer_source(cfg)
    aligned_path = aligned_model_dir(cfg, variant)  # checked finished by variant_config
    if sec.collect_from == "aligned":
        data_path = collect_from_aligned(cfg, aligned_path, vdir)
    else:
        _, data_path = data_source(cfg)
    records = read_jsonl(data_path, "sft")
    if not records:
        raise TaxfreeError(f"{data_path}: no records: AMA needs collected data to train on")
    if sec.max_examples is not None:
        records = records[: sec.max_examples]
    tokenizer = load_tokenizer(tok_path, trust_remote_code=trust)
    batches = lm_batches(records, tokenizer, sec.batch_size, sec.max_length, seed=cfg.seed)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sft = load_causal_lm(sft_path, trust_remote_code=trust, dtype=torch.float32).to(device).eval()
    aligned = load_causal_lm(aligned_path, trust_remote_code=trust, dtype=torch.float32).to(device).eval()
    averager = AdaptiveModelAverager(sft, aligned, blocks=sec.blocks, head_block=sec.head_block, sft_mean=sec.sft_mean,
                                     eps=sec.eps, reg=sec.reg, reg_weighting=sec.reg_weighting,
                                     embed_aligned_weight=sec.embed_aligned_weight,
                                     head_aligned_weight=sec.head_aligned_weight).to(device)
    # Dropout would make the objective noisy and the result depend on RNG; the paper's models have none.
    averager.eval()
    writer = SummaryWriter(log_dir=str(vdir / "tb"))

    def log(step, values):
        for k, v in values.items():
            writer.add_scalar(f"ama/{k}", v, step)

    try:
        result = train_ama(averager, batches, lr=sec.lr, epochs=sec.epochs, warmup_ratio=sec.warmup_ratio,
                           max_grad_norm=sec.max_grad_norm, state_path=vdir / STATE_NAME, save_steps=sec.save_steps,
                           log_fn=log)
    finally:
        writer.close()
    summary = averager.export_merged(vdir / "model", tokenizer=tokenizer, overwrite=True)
    shutil.copy2(vdir / "model" / WEIGHTS_NAME, vdir / WEIGHTS_NAME)
    aligned_weights = [b["aligned_weight"] for b in summary["blocks"]]
    metrics = {
        "aligned": variant,
        "blocks": len(aligned_weights),
        "mean_aligned_weight": sum(aligned_weights) / len(aligned_weights),
        "aligned_weight_by_block": aligned_weights,
        "steps": result["steps"],
        "examples": sum(len(b["input_ids"]) for b in batches),
        "first_loss": result["losses"][0] if result["losses"] else None,
        "last_loss": result["losses"][-1] if result["losses"] else None,
        "first_nll": result["nll"][0] if result["nll"] else None,
        "last_nll": result["nll"][-1] if result["nll"] else None,
        "resumed_from_step": result["resumed_from"],
    }
    (vdir / STATE_NAME).unlink(missing_ok=True)  # the model is written; the training state is no longer needed
    return metrics


def run(ctx) -> dict:
    cfg = ctx.cfg
    names = variant_names(cfg, cfg.ama.aligned)
    configs = {v: variant_config(cfg, v) for v in names}
    shared = ["sft", "tokenizer"] + (["prompts", "reward_model"] if cfg.ama.collect_from == "aligned" else ["data"])
    results = run_variants(ctx, configs, lambda name, vdir, resumed: train_variant(cfg, name, vdir),
                           inputs_of=lambda name: shared)
    out = {"variants": len(results)}
    for name, m in results.items():
        w = m.get("metrics", {}).get("mean_aligned_weight")
        if isinstance(w, float):
            out[f"{name}/mean_aligned_weight"] = w
    return out


STAGE = Stage(
    name="ama",
    help="adaptive model averaging: learned per-block aligned weights",
    config=AmaStageConfig,
    inputs=inputs,
    section=section,
    run=run,
    check=lambda cfg: check_aligned(cfg, "ama"),
    checkpoints={"sft": "causal_lm", "reward_model": "classifier"},
    needs_eos=True,
    makes_models=True,
    keeps_variants=True,
)

