"""`align`: preference alignment, one variant per method x optimizer.

The policy starts from the SFT model, the reference is the SFT model, and the online merging
optimizers get tau = SFT - base. TRL trains the methods it has (DPOTrainer: dpo, ipo, hinge,
exo-pair; KTOTrainer: kto); our ContrastiveTrainer trains the rest (kto-pair and the K-way
exo-pref / exo-rw / dpo-rw / dpo-pref). Each variant writes `align/<method>-<optimizer>/`.
"""

from __future__ import annotations

import dataclasses

from taxfree.data.records import pref_to_kto, read_jsonl, rw_to_pref
from taxfree.errors import TaxfreeError
from taxfree.losses import METHOD_BACKENDS
from taxfree.losses.methods import TAXFREE_CONTRASTIVE, TRL_DPO, TRL_KTO
from taxfree.optim.trainer import hand_optimizer_to_trainer
from taxfree.models.load import load_causal_lm, load_tokenizer
from taxfree.pipeline.config import variant_name
from taxfree.pipeline.resolve import base_model_source, data_source, sft_model_source, tokenizer_source
from taxfree.pipeline.runner import run_variants
from taxfree.stages.callbacks import LastLogs, numeric
from taxfree.stages.common import (build_stage_optimizer, check_lengths, last_checkpoint, loaded_partitioned,
                                    resumed_from_step, save_model, tensorboard_callback, trainer_kwargs,
                                    whole_run_train_loss)

KEEPS_VARIANTS = True
RW_METHODS = ("exo-rw", "dpo-rw")


def variants(cfg) -> dict[str, tuple[str, str]]:
    return {variant_name(m, o): (m, o) for m in cfg.align.methods for o in cfg.align.optimizers}


def inputs(cfg) -> dict:
    out = {
        "sft": sft_model_source(cfg),
        "tokenizer": tokenizer_source(cfg),
        "train": data_source(cfg, "pref_train"),
        "eval": data_source(cfg, "pref_eval"),
    }
    if any(o != "adamw" for o in cfg.align.optimizers):
        opt = cfg.align.optimizer
        out["base"] = (None, opt.base) if opt.base else base_model_source(cfg)
        if opt.ref:
            out["optimizer_ref"] = (None, opt.ref)
    if any(m in RW_METHODS for m in cfg.align.methods) or cfg.align.pref_pairs == "samples":
        out["samples"] = ("sample", str(cfg.stage_dir("sample") / "rw.jsonl"))
    return out


def preflight(cfg) -> None:
    """Config combinations only this stage can judge, checked before any stage runs."""
    k = cfg.align.num_completions
    rw = [m for m in cfg.align.methods if m in RW_METHODS]
    if k is not None and rw and k > cfg.sample.num_completions:
        raise TaxfreeError(
            f"{cfg.source}: align.num_completions: K = {k} is more than the {cfg.sample.num_completions} completions "
            f"per prompt the sample stage draws (sample.num_completions) for {rw[0]}; lower K or sample more"
        )


def section(cfg) -> dict:
    return {"align": dataclasses.asdict(cfg.align), "seed": cfg.seed, "trust_remote_code": cfg.models.trust_remote_code}


def variant_config(cfg, method: str, optimizer: str) -> dict:
    """What shapes one variant: the align settings without the lists, plus its own pair."""
    sec = dataclasses.asdict(cfg.align)
    sec.pop("methods")
    sec.pop("optimizers")
    sec["optimizer"]["name"] = optimizer
    if optimizer == "adamw":
        for k in ("reserve_p", "alpha", "use_merge", "rescale", "online_step", "clip_tau", "ref", "base"):
            sec["optimizer"].pop(k)
    return {"method": method, "optimizer": optimizer, "align": sec, "seed": cfg.seed,
            "trust_remote_code": cfg.models.trust_remote_code}


def _pref_rows(path: str) -> list[dict]:
    return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in read_jsonl(path, "pref")]


def pairs_from_samples(records: list[dict]) -> list[dict]:
    """One pair per prompt from its first two sampled completions (an independent K = 2 draw),
    the higher reward chosen; prompts whose two rewards tie, or whose two texts are the same,
    give none (EXO's pairwise setting on IMDB)."""
    pairs = []
    for r in records:
        pair = rw_to_pref({"prompt": r["prompt"], "completions": r["completions"][:2], "rewards": r["rewards"][:2]})
        if pair is not None:
            pairs.append(pair)
    return pairs


def _datasets(cfg, method: str):
    """(train, eval) datasets in the format the method's trainer takes."""
    from datasets import Dataset

    _, train_path = data_source(cfg, "pref_train")
    _, eval_path = data_source(cfg, "pref_eval")
    eval_rows = _pref_rows(eval_path) if eval_path else None
    if method in RW_METHODS:
        rows = [{"prompt": r["prompt"], "completions": r["completions"], "rewards": r["rewards"]}
                for r in read_jsonl(cfg.stage_dir("sample") / "rw.jsonl", "rw")]
        train = Dataset.from_list(rows)
        # Held-out pairs as K = 2 reward-labelled records (winner reward 1, loser 0).
        evald = Dataset.from_list([{"prompt": r["prompt"], "completions": [r["chosen"], r["rejected"]], "rewards": [1.0, 0.0]}
                                   for r in eval_rows]) if eval_rows else None
        return train, evald
    if cfg.align.pref_pairs == "samples":
        train_rows = pairs_from_samples(read_jsonl(cfg.stage_dir("sample") / "rw.jsonl", "rw"))
        if not train_rows:
            raise TaxfreeError(f"{cfg.stage_dir('sample') / 'rw.jsonl'}: no prompt's first two samples differ in reward: "
                               "no pairs to train on")
    elif train_path is None:
        raise TaxfreeError(f"{cfg.source}: data.pref_train: required by the align stage (or align.pref_pairs: samples)")
    else:
        train_rows = _pref_rows(train_path)
    if method == "kto":
        def unpaired(rows):
            return Dataset.from_list([{k: x[k] for k in ("prompt", "completion", "label")} for r in rows for x in pref_to_kto(r)])

        return unpaired(train_rows), unpaired(eval_rows) if eval_rows else None
    return Dataset.from_list(train_rows), Dataset.from_list(eval_rows) if eval_rows else None


def _args(cfg, method: str, vdir):
    """The method's trainer config (TRL's DPOConfig / KTOConfig or our ContrastiveConfig)."""
    sec = cfg.align
    backend = METHOD_BACKENDS[method]
    common = trainer_kwargs(sec, vdir, cfg.seed)
    if backend.trainer == TRL_DPO:
        from trl import DPOConfig

        label_smoothing = sec.pref_eps if method == "exo-pair" else sec.label_smoothing
        return DPOConfig(**common, loss_type=[backend.loss_type], beta=sec.beta, label_smoothing=label_smoothing,
                         max_length=sec.max_length, precompute_ref_log_probs=sec.precompute_ref_log_probs)
    if backend.trainer == TRL_KTO:
        from trl import KTOConfig

        return KTOConfig(**common, loss_type=backend.loss_type, beta=sec.beta, max_length=sec.max_length,
                         precompute_ref_log_probs=sec.precompute_ref_log_probs)
    if backend.trainer == TAXFREE_CONTRASTIVE:
        from taxfree.trainers import ContrastiveConfig

        return ContrastiveConfig(**common, loss_type=backend.loss_type, beta=sec.beta, beta_pi=sec.beta_pi,
                                 beta_r=sec.beta_r, pref_eps=sec.pref_eps, temperature=sec.temperature,
                                 max_length=sec.max_length, max_prompt_length=sec.max_prompt_length,
                                 num_completions=sec.num_completions if method in RW_METHODS else None)
    raise TaxfreeError(f"align: no trainer for method {method!r}")  # pragma: no cover


def _trainer(method: str, args, model, ref_model, tokenizer, train, evald, callbacks):
    trainer_kind = METHOD_BACKENDS[method].trainer
    if trainer_kind == TRL_DPO:
        from trl import DPOTrainer as Trainer
    elif trainer_kind == TRL_KTO:
        from trl import KTOTrainer as Trainer
    else:
        from taxfree.trainers import ContrastiveTrainer as Trainer
    return Trainer(model=model, ref_model=ref_model, args=args, train_dataset=train, eval_dataset=evald,
                   processing_class=tokenizer, optimizers=(None, None), callbacks=callbacks)


def train_variant(cfg, method: str, optimizer_name: str, vdir) -> dict:
    trust = cfg.models.trust_remote_code
    _, sft_path = sft_model_source(cfg)
    _, tok_path = tokenizer_source(cfg)
    tokenizer = load_tokenizer(tok_path, trust_remote_code=trust)
    if not getattr(cfg.align, "truncation", True):  # config field `truncation` (default true: TRL truncates)
        for key in ("pref_train", "pref_eval"):
            _, path = data_source(cfg, key)
            if path is not None:
                check_lengths(path, read_jsonl(path, "pref"), tokenizer, "align", cfg.align.max_length,
                              cfg.align.max_prompt_length)
    # The trainer's config before the models: under DeepSpeed ZeRO-3 with zero3_init_flag it makes
    # from_pretrained build them already partitioned (deepspeed.zero.Init), so no rank holds a whole one.
    args = _args(cfg, method, vdir)
    model = load_causal_lm(sft_path, trust_remote_code=trust)
    ref_model = load_causal_lm(sft_path, trust_remote_code=trust)
    partitioned = loaded_partitioned(model)
    train, evald = _datasets(cfg, method)
    if len(train) == 0:
        raise TaxfreeError(f"align/{method}: the training set is empty")

    sec = dataclasses.replace(cfg.align, optimizer=dataclasses.replace(cfg.align.optimizer, name=optimizer_name))
    optimizer = None
    if optimizer_name != "adamw":
        opt = cfg.align.optimizer
        _, base_path = (None, opt.base) if opt.base else base_model_source(cfg)
        optimizer = build_stage_optimizer(model, sec, ref=opt.ref or sft_path, base=base_path, seed=cfg.seed)

    logs = LastLogs()
    trainer = _trainer(method, args, model, ref_model, tokenizer, train, evald, [tensorboard_callback(vdir), logs])
    # Through the Trainer's optimizer factory, not `optimizers=`: DeepSpeed would replace an optimizer
    # passed in with its AdamW, and FSDP refuses one (taxfree.optim.trainer).
    hand_optimizer_to_trainer(trainer, optimizer)
    result = trainer.train(resume_from_checkpoint=last_checkpoint(vdir))
    metrics = {"method": method, "optimizer": optimizer_name, "train_loss": whole_run_train_loss(trainer, result),
               "resumed_from_step": resumed_from_step(trainer),
               "steps": result.global_step, "train_examples": len(train), "loaded_partitioned": partitioned}
    metrics.update(numeric({k: v for k, v in logs.train.items() if "/" in k}, "train_"))
    if evald is not None:
        trainer.evaluate()
        # The manifest keeps what the model did: not timings, nor TRL's count of training tokens
        # seen, which restarts from zero when a run resumes (it is not in the checkpoint).
        metrics.update(numeric({k: v for k, v in logs.eval.items()
                                if not k.endswith(("_runtime", "_per_second", "num_tokens"))}))
    # The KL-like statistic: mean log-ratio z = log pi - log pi_ref of chosen / rejected responses.
    for side in ("chosen", "rejected"):
        key = f"eval_rewards/{side}"
        if key in metrics and METHOD_BACKENDS[method].trainer == TRL_DPO:
            metrics[f"eval_logratio/{side}"] = metrics[key] / cfg.align.beta
    save_model(trainer.model, tokenizer, vdir / "model", trainer=trainer)
    return metrics


def run(ctx) -> dict:
    cfg = ctx.cfg
    table = variants(cfg)
    configs = {name: variant_config(cfg, m, o) for name, (m, o) in table.items()}

    def inputs_of(name: str) -> list[str]:
        method, optimizer = table[name]
        names = ["sft", "tokenizer", "train", "eval"]
        if method in RW_METHODS:
            names.append("samples")
        if optimizer != "adamw":
            names += ["base", "optimizer_ref"]
        return names

    results = run_variants(ctx, configs, lambda name, vdir, resumed: train_variant(cfg, *table[name], vdir), inputs_of)
    summary = {}
    for name, manifest in results.items():
        m = manifest.get("metrics", {})
        for k in ("train_loss", "eval_rewards/accuracies", "eval_rewards/margins"):
            if isinstance(m.get(k), (int, float)):
                summary[f"{name}/{k}"] = m[k]
    summary["variants"] = len(results)
    return summary
