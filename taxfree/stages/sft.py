"""`sft`: supervised fine-tuning of the base model with TRL's SFTTrainer, loss on responses only.

Records (`messages` or prompt/completion) become TRL's conversational prompt-completion format,
so TRL masks the prompt; the held-out response loss is measured before and after.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from taxfree.data.records import read_jsonl
from taxfree.errors import ConfigError, TaxfreeError
from taxfree.models.load import load_causal_lm, load_tokenizer
from taxfree.optim.registry import optimizer_spec
from taxfree.optim.trainer import hand_optimizer_to_trainer
from taxfree.pipeline.resolve import base_model_source, data_source, tokenizer_source
from taxfree.pipeline.rundir import last_checkpoint
from taxfree.pipeline.stages import Stage
from taxfree.pipeline.train_config import TrainConfig
from taxfree.stages.common import (
    build_stage_optimizer,
    check_lengths,
    evaluate_before_training,
    loaded_partitioned,
    resumed_from_step,
    save_model,
    tensorboard_callback,
    trainer_kwargs,
    whole_run_train_loss,
)


@dataclass
class SFTStageConfig(TrainConfig):
    """Supervised fine-tuning with TRL's SFTTrainer, loss on responses only."""

    epochs: float = 2.0
    lr: float = 2e-5
    batch_size: int = 8
    max_length: int = 1024
    completion_only_loss: bool = True


def check(cfg) -> None:
    """Where the base model and the SFT data come from when no tiny world makes them, and the
    two models a merging optimizer needs (the run provides them to align only)."""
    src = cfg.source
    if cfg.world.kind != "tiny":
        if cfg.models.base is None and cfg.models.sft is None:
            raise ConfigError(f"{src}: models.base: required when world.kind is not 'tiny' (nothing pretrains a base model)")
        if cfg.models.sft is None and cfg.data.sft_train is None:
            raise ConfigError(f"{src}: data.sft_train: required to run sft when world.kind is not 'tiny'")
    opt = cfg.sft.optimizer
    if optimizer_spec(opt.name).merging and (opt.ref is None or opt.base is None):
        missing = "ref" if opt.ref is None else "base"
        raise ConfigError(f"{src}: sft.optimizer.{missing}: {opt.name} in sft needs optimizer.ref and optimizer.base "
                          "(tau = ref - base); the run provides them only to the align stage")


def inputs(cfg) -> dict:
    out = {
        "base": base_model_source(cfg),
        "tokenizer": tokenizer_source(cfg),
        "train": data_source(cfg, "sft_train"),
        "eval": data_source(cfg, "sft_eval"),
    }
    for key in ("ref", "base"):
        value = getattr(cfg.sft.optimizer, key)
        if value is not None and optimizer_spec(cfg.sft.optimizer.name).merging:
            out[f"optimizer_{key}"] = (None, value)
    return out


def section(cfg) -> dict:
    return {"sft": dataclasses.asdict(cfg.sft), "seed": cfg.seed, "trust_remote_code": cfg.models.trust_remote_code}


def to_prompt_completion(record: dict) -> dict:
    """TRL's conversational prompt/completion: every message but the last is the prompt."""
    if "messages" in record:
        msgs = record["messages"]
        return {"prompt": msgs[:-1], "completion": msgs[-1:]}
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str) != isinstance(completion, str):
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        else:
            completion = [{"role": "assistant", "content": completion}]
    return {"prompt": prompt, "completion": completion}


def load_sft_dataset(path: str):
    from datasets import Dataset

    records = [to_prompt_completion(r) for r in read_jsonl(path, "sft")]
    return Dataset.from_list(records)


def run(ctx) -> dict:
    from trl import SFTConfig, SFTTrainer

    cfg, sec = ctx.cfg, ctx.cfg.sft
    trust = cfg.models.trust_remote_code
    _, base_path = base_model_source(cfg)
    _, tok_path = tokenizer_source(cfg)
    _, train_path = data_source(cfg, "sft_train")
    _, eval_path = data_source(cfg, "sft_eval")
    if train_path is None:
        raise TaxfreeError(f"{cfg.source}: data.sft_train: required by the sft stage")
    tokenizer = load_tokenizer(tok_path, trust_remote_code=trust)
    if not getattr(sec, "truncation", True):  # config field `truncation` (default true: TRL truncates)
        for path in filter(None, (train_path, eval_path)):
            check_lengths(path, read_jsonl(path, "sft"), tokenizer, "sft", sec.max_length)
    train = load_sft_dataset(train_path)
    evald = load_sft_dataset(eval_path) if eval_path else None
    # The trainer's config before the model: under DeepSpeed ZeRO-3 with zero3_init_flag it makes
    # from_pretrained build it already partitioned (deepspeed.zero.Init), so no rank holds a whole one.
    args = SFTConfig(
        **trainer_kwargs(sec, ctx.dir, cfg.seed),
        max_length=sec.max_length,
        completion_only_loss=sec.completion_only_loss,
        packing=False,
        dataset_num_proc=None,
    )
    model = load_causal_lm(base_path, trust_remote_code=trust)
    partitioned = loaded_partitioned(model)

    opt = sec.optimizer
    # In SFT there is no run-given SFT/base pair: tau comes from optimizer.ref/base (validated).
    optimizer = build_stage_optimizer(model, sec, ref=opt.ref, base=opt.base, seed=cfg.seed)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evald,
        processing_class=tokenizer,
        callbacks=[tensorboard_callback(ctx.dir)],
    )
    hand_optimizer_to_trainer(trainer, optimizer)  # works under DDP, FSDP2 and DeepSpeed ZeRO (taxfree.optim.trainer)
    metrics = {}
    if evald is not None:
        before = evaluate_before_training(trainer, metric_key_prefix="eval_before")  # also under DeepSpeed ZeRO
        metrics["eval_loss_before"] = before["eval_before_loss"]
    result = trainer.train(resume_from_checkpoint=last_checkpoint(ctx.dir))
    if evald is not None:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
    save_model(trainer.model, tokenizer, ctx.dir / "model", trainer=trainer)
    metrics.update(
        train_loss=whole_run_train_loss(trainer, result),
        resumed_from_step=resumed_from_step(trainer),
        steps=result.global_step,
        train_examples=len(train),
        eval_examples=len(evald) if evald is not None else 0,
        optimizer=opt.name,
        loaded_partitioned=partitioned,
    )
    return metrics


STAGE = Stage(
    name="sft",
    help="supervised fine-tuning (TRL SFTTrainer, loss on responses)",
    config=SFTStageConfig,
    inputs=inputs,
    section=section,
    run=run,
    check=check,
    checkpoints={"base": "causal_lm", "optimizer_ref": "causal_lm", "optimizer_base": "causal_lm"},
    needs_eos=True,
    applies=lambda cfg: cfg.models.sft is None,
)

