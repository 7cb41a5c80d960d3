"""`rm`: a reward model trained on preference pairs with TRL's RewardTrainer.

The backbone is the run's SFT model by default (its architecture as a sequence classifier with
a new scalar head) or any model that loads as one. Held-out pairwise accuracy is measured by
scoring the eval pairs with the same scorer the later stages use.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from taxfree.data.records import read_jsonl
from taxfree.errors import TaxfreeError
from taxfree.models.load import load_tokenizer
from taxfree.pipeline.paths import is_model_ref
from taxfree.pipeline.resolve import data_source, sft_model_source, tokenizer_source
from taxfree.pipeline.rundir import last_checkpoint
from taxfree.pipeline.schema import require
from taxfree.pipeline.stages import Stage
from taxfree.pipeline.train_config import TrainConfig
from taxfree.stages.callbacks import LastLogs, numeric
from taxfree.stages.common import resumed_from_step, save_model, tensorboard_callback, trainer_kwargs, whole_run_train_loss


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

    def check(self):
        super().check()
        require(is_model_ref(self.backbone), "backbone", f"model directory not found: {self.backbone}")


def backbone_source(cfg):
    if cfg.rm.backbone is not None:
        return None, cfg.rm.backbone
    return sft_model_source(cfg)


def inputs(cfg) -> dict:
    out = {
        "backbone": backbone_source(cfg),
        "train": data_source(cfg, "pref_train"),
        "eval": data_source(cfg, "pref_eval"),
    }
    if cfg.rm.backbone is None:
        out["tokenizer"] = tokenizer_source(cfg)
    return out


def section(cfg) -> dict:
    return {"rm": dataclasses.asdict(cfg.rm), "seed": cfg.seed, "trust_remote_code": cfg.models.trust_remote_code}


def pairs_dataset(path: str):
    from datasets import Dataset

    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in read_jsonl(path, "pref")]
    return Dataset.from_list(rows)


def load_reward_backbone(path: str, tokenizer, trust_remote_code: bool):
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, trust_remote_code=trust_remote_code, ignore_mismatched_sizes=True
        )
    except (OSError, ValueError) as e:
        raise TaxfreeError(f"{path}: cannot load as a sequence classifier: {str(e).splitlines()[0]}") from None
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def pairwise_accuracy(model, tokenizer, records: list[dict], batch_size: int) -> dict:
    from taxfree.data.records import completion_text
    from taxfree.eval.reward import score_with_reward_model

    prompts = [r["prompt"] for r in records]
    chosen = score_with_reward_model(model, tokenizer, prompts, [completion_text(r["chosen"]) for r in records], batch_size=batch_size)
    rejected = score_with_reward_model(model, tokenizer, prompts, [completion_text(r["rejected"]) for r in records], batch_size=batch_size)
    wins = [c > r for c, r in zip(chosen, rejected)]
    return {
        "eval_pairwise_accuracy": sum(wins) / len(wins),
        "eval_mean_margin": sum(c - r for c, r in zip(chosen, rejected)) / len(wins),
        "eval_pairs": len(wins),
    }


def run(ctx) -> dict:
    from transformers import set_seed
    from trl import RewardConfig, RewardTrainer

    cfg, sec = ctx.cfg, ctx.cfg.rm
    trust = cfg.models.trust_remote_code
    _, backbone = backbone_source(cfg)
    _, tok_path = tokenizer_source(cfg) if sec.backbone is None else (None, sec.backbone)
    _, train_path = data_source(cfg, "pref_train")
    _, eval_path = data_source(cfg, "pref_eval")
    if train_path is None:
        raise TaxfreeError(f"{cfg.source}: data.pref_train: required by the rm stage")
    tokenizer = load_tokenizer(tok_path, trust_remote_code=trust)
    # The new scalar head is drawn from the global RNG: seeded here, it is the same whatever ran
    # before in this process (all stages in one run, or rm alone after its upstream was skipped),
    # so a resumed run's "before" metrics and a re-run's weights match an uninterrupted run's.
    set_seed(cfg.seed)
    model = load_reward_backbone(backbone, tokenizer, trust)
    train = pairs_dataset(train_path)
    eval_records = read_jsonl(eval_path, "pref") if eval_path else []

    logs = LastLogs()
    args = RewardConfig(
        **trainer_kwargs(sec, ctx.dir, cfg.seed),
        max_length=sec.max_length,
        center_rewards_coefficient=sec.center_rewards_coefficient,
        disable_dropout=True,
    )
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=[tensorboard_callback(ctx.dir), logs],
    )
    metrics = {}
    if eval_records:
        metrics.update({f"{k}_before": v for k, v in pairwise_accuracy(model, tokenizer, eval_records, sec.eval_batch_size).items()
                        if k != "eval_pairs"})
    result = trainer.train(resume_from_checkpoint=last_checkpoint(ctx.dir))
    if eval_records:
        metrics.update(pairwise_accuracy(trainer.model, tokenizer, eval_records, sec.eval_batch_size))
    save_model(trainer.model, tokenizer, ctx.dir / "model", trainer=trainer)
    metrics.update(numeric({k: v for k, v in logs.train.items() if k in ("accuracy", "margin")}, "train_"))
    metrics.update(train_loss=whole_run_train_loss(trainer, result), steps=result.global_step, train_pairs=len(train),
                   resumed_from_step=resumed_from_step(trainer))
    return metrics


STAGE = Stage(
    name="rm",
    help="train the reward model (TRL RewardTrainer on preference pairs)",
    config=RMStageConfig,
    inputs=inputs,
    section=section,
    run=run,
    checkpoints={"backbone": "classifier"},
    needs_eos=True,
)

