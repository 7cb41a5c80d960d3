"""`align`: preference alignment, one variant per method x optimizer.

The policy starts from the SFT model, the reference is the SFT model, and the online merging
optimizers get tau = SFT - base. Each method is declared in the method registry
(taxfree.losses.methods): TRL trains the methods it has (DPOTrainer, KTOTrainer), our
ContrastiveTrainer the rest (kto-pair and the K-way EXO family). Each variant writes
`align/<method>-<optimizer>/`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from taxfree.data.records import pref_to_kto, read_jsonl, rw_to_pref
from taxfree.errors import ConfigError, TaxfreeError, nearest
from taxfree.losses.methods import TRL_DPO, TRL_KTO, align_method, method_names, method_params
from taxfree.models.load import load_causal_lm, load_tokenizer
from taxfree.optim.registry import optimizer_names, optimizer_spec
from taxfree.optim.trainer import hand_optimizer_to_trainer
from taxfree.pipeline.resolve import base_model_source, data_source, sft_model_source, tokenizer_source
from taxfree.pipeline.rundir import last_checkpoint, run_variants
from taxfree.pipeline.schema import check_params, param_fields, require
from taxfree.pipeline.stages import Stage
from taxfree.pipeline.train_config import TrainConfig, settings_of
from taxfree.stages.callbacks import LastLogs, numeric
from taxfree.stages.common import (build_stage_optimizer, check_lengths, loaded_partitioned, resumed_from_step,
                                    save_model, tensorboard_callback, trainer_kwargs, whole_run_train_loss)


@dataclass
class AlignSettings(TrainConfig):
    """Preference alignment: every method x optimizer listed is one variant, one model. The
    methods' own settings (beta, beta_pi, ...) are added from their declarations: AlignStageConfig."""

    methods: list[str] = field(default_factory=lambda: ["dpo"])
    optimizers: list[str] = field(default_factory=lambda: ["adamw"])
    epochs: float = 1.0
    lr: float = 1e-6
    warmup_ratio: float = 0.1
    batch_size: int = 8
    max_length: int = 1024
    max_prompt_length: int = 512
    temperature: float = 1.0  # ContrastiveTrainer's methods: both models' logits are divided by it
    num_completions: int | None = None  # K for the methods that train on samples; null = all sampled
    # Where the pairwise methods' pairs come from: "data" = data.pref_train (human pairs);
    # "samples" = the sample stage's completions, two per prompt labelled by the reward (EXO's
    # pref setting on IMDB: an independent K = 2 draw, the higher reward chosen, ties dropped).
    pref_pairs: Literal["data", "samples"] = "data"
    precompute_ref_log_probs: bool = False

    def check(self):
        super().check()
        require(len(self.methods) >= 1, "methods", "list at least one method")
        known = method_names()
        for m in self.methods:
            require(m in known, "methods", f"unknown method {m!r}{nearest(m, known)}")
        require(len(set(self.methods)) == len(self.methods), "methods", "a method is listed twice")
        require(len(self.optimizers) >= 1, "optimizers", "list at least one optimizer")
        for o in self.optimizers:
            require(o in optimizer_names(), "optimizers", f"unknown optimizer {o!r}{nearest(o, optimizer_names())}")
        require(len(set(self.optimizers)) == len(self.optimizers), "optimizers", "an optimizer is listed twice")
        check_params(self, method_params().values())
        require(self.temperature > 0, "temperature", "must be > 0")
        require(self.max_prompt_length < self.max_length, "max_prompt_length", "must be < max_length")
        require(self.num_completions is None or self.num_completions >= 2, "num_completions", "must be >= 2")


AlignStageConfig = dataclasses.make_dataclass(
    "AlignStageConfig", param_fields(method_params().values()), bases=(AlignSettings,),
    namespace={"__module__": __name__, "__doc__": AlignSettings.__doc__},
)


def variant_name(method: str, optimizer: str) -> str:
    """The align variant of a method and an optimizer: its directory `align/<method>-<optimizer>/`."""
    return f"{method}-{optimizer}"


def variant_names(cfg, selected: list[str] | None = None) -> list[str]:
    """Names of the align stage's variants, `<method>-<optimizer>`; or `selected` (a later stage's
    `aligned` list) when it is given."""
    if selected is not None:
        return list(selected)
    return [variant_name(m, o) for m in cfg.align.methods for o in cfg.align.optimizers]


def check(cfg) -> None:
    """A merging optimizer needs the model SFT started from, which only the tiny world makes."""
    merging = [o for o in cfg.align.optimizers if optimizer_spec(o).merging]
    if merging and "align" in cfg.enabled_stages() and cfg.world.kind != "tiny" and cfg.models.base is None \
            and cfg.align.optimizer.base is None:
        raise ConfigError(
            f"{cfg.source}: models.base: {merging[0]} needs the model SFT started from (tau = sft - base); set models.base"
        )


def variants(cfg) -> dict[str, tuple[str, str]]:
    return {variant_name(m, o): (m, o) for m in cfg.align.methods for o in cfg.align.optimizers}


def inputs(cfg) -> dict:
    out = {
        "sft": sft_model_source(cfg),
        "tokenizer": tokenizer_source(cfg),
        "train": data_source(cfg, "pref_train"),
        "eval": data_source(cfg, "pref_eval"),
    }
    if any(optimizer_spec(o).merging for o in cfg.align.optimizers):
        opt = cfg.align.optimizer
        out["base"] = (None, opt.base) if opt.base else base_model_source(cfg)
        if opt.ref:
            out["optimizer_ref"] = (None, opt.ref)
    if any(align_method(m).needs_samples for m in cfg.align.methods) or cfg.align.pref_pairs == "samples":
        out["samples"] = ("sample", str(cfg.stage_dir("sample") / "rw.jsonl"))
    return out


def preflight(cfg) -> None:
    """Config combinations only this stage can judge, checked before any stage runs."""
    k = cfg.align.num_completions
    rw = [m for m in cfg.align.methods if align_method(m).needs_samples]
    if k is not None and rw and k > cfg.sample.num_completions:
        raise TaxfreeError(
            f"{cfg.source}: align.num_completions: K = {k} is more than the {cfg.sample.num_completions} completions "
            f"per prompt the sample stage draws (sample.num_completions) for {rw[0]}; lower K or sample more"
        )


def section(cfg) -> dict:
    return {"align": dataclasses.asdict(cfg.align), "seed": cfg.seed, "trust_remote_code": cfg.models.trust_remote_code}


def variant_config(cfg, method: str, optimizer: str) -> dict:
    """What shapes one variant: the shared align settings, its method's own settings and its
    optimizer's own hyperparameters (another method's beta_pi does not re-train a dpo variant)."""
    sec = dataclasses.asdict(cfg.align)
    for key in ("methods", "optimizers", *method_params()):
        sec.pop(key)
    sec.update(align_method(method).settings(cfg.align))
    opt = dataclasses.replace(cfg.align.optimizer, name=optimizer)
    sec["optimizer"] = {"name": optimizer, **settings_of(opt)}
    if optimizer_spec(optimizer).merging:
        sec["optimizer"].update(ref=opt.ref, base=opt.base)
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
    if align_method(method).needs_samples:
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
    if align_method(method).trainer == TRL_KTO:  # the pairs taken apart into single examples
        def unpaired(rows):
            return Dataset.from_list([{k: x[k] for k in ("prompt", "completion", "label")} for r in rows for x in pref_to_kto(r)])

        return unpaired(train_rows), unpaired(eval_rows) if eval_rows else None
    return Dataset.from_list(train_rows), Dataset.from_list(eval_rows) if eval_rows else None


def _args(cfg, method: str, vdir):
    """The method's trainer config (TRL's DPOConfig / KTOConfig or our ContrastiveConfig)."""
    sec = cfg.align
    m = align_method(method)
    settings = m.settings(sec)
    common = trainer_kwargs(sec, vdir, cfg.seed)
    if m.trainer in (TRL_DPO, TRL_KTO):
        from trl import DPOConfig, KTOConfig

        mapped = {arg: settings[name] for arg, name in m.trainer_args.items()}
        loss_type = [m.loss_type] if m.trainer == TRL_DPO else m.loss_type  # DPOConfig takes a list
        config = DPOConfig if m.trainer == TRL_DPO else KTOConfig
        return config(**common, loss_type=loss_type, max_length=sec.max_length,
                      precompute_ref_log_probs=sec.precompute_ref_log_probs, **mapped)
    from taxfree.trainers import ContrastiveConfig

    own = {f.name for f in dataclasses.fields(ContrastiveConfig)}
    return ContrastiveConfig(**common, loss_type=method, temperature=sec.temperature, max_length=sec.max_length,
                             max_prompt_length=sec.max_prompt_length,
                             num_completions=sec.num_completions if m.needs_samples else None,
                             loss_params={k: v for k, v in settings.items() if k not in own} or None,
                             **{k: v for k, v in settings.items() if k in own})


def _trainer(method: str, args, model, ref_model, tokenizer, train, evald, callbacks):
    trainer_kind = align_method(method).trainer
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
    if optimizer_name != "adamw":  # torch AdamW is the Trainer's own
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
        m = align_method(method)
        if key in metrics and m.trainer == TRL_DPO:
            metrics[f"eval_logratio/{side}"] = metrics[key] / m.settings(cfg.align)[m.reward_scale]
    save_model(trainer.model, tokenizer, vdir / "model", trainer=trainer)
    return metrics


def run(ctx) -> dict:
    cfg = ctx.cfg
    table = variants(cfg)
    configs = {name: variant_config(cfg, m, o) for name, (m, o) in table.items()}

    def inputs_of(name: str) -> list[str]:
        method, optimizer = table[name]
        names = ["sft", "tokenizer", "train", "eval"]
        if align_method(method).needs_samples:
            names.append("samples")
        if optimizer_spec(optimizer).merging:
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


STAGE = Stage(
    name="align",
    help="preference alignment: every method x optimizer (taxfree align --help lists them)",
    config=AlignStageConfig,
    inputs=inputs,
    section=section,
    run=run,
    preflight=preflight,
    check=check,
    checkpoints={"sft": "causal_lm", "base": "causal_lm", "optimizer_ref": "causal_lm"},
    needs_eos=True,
    makes_models=True,
    keeps_variants=True,
)

