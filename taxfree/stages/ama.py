"""`ama`: Adaptive Model Averaging of the SFT model with each aligned variant (ALGORITHMS.md 4).

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
import json
import shutil

from taxfree.data.records import read_jsonl
from taxfree.errors import TaxfreeError
from taxfree.pipeline.resolve import sft_model_source, tokenizer_source
from taxfree.pipeline.runner import run_variants
from taxfree.stages.merge import aligned_model, aligned_model_dir

KEEPS_VARIANTS = True
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
    names = cfg.align_variants(cfg.ama.aligned)
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
