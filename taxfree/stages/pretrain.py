"""`pretrain`: causal LM on the world's corpus, which makes the run's `base` model.

Lines are joined with eos and packed into fixed-length blocks; held-out loss is measured on
held-out lines before and after, so the manifest shows what pretraining learned.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from taxfree.data.records import read_jsonl
from taxfree.errors import TaxfreeError
from taxfree.models.load import load_tokenizer, require_eos
from taxfree.pipeline.resolve import data_source, tokenizer_source
from taxfree.pipeline.rundir import last_checkpoint
from taxfree.pipeline.schema import require
from taxfree.pipeline.stages import Stage
from taxfree.pipeline.train_config import TrainConfig
from taxfree.stages.common import (evaluate_before_training, resumed_from_step, save_model, tensorboard_callback,
                                    trainer_kwargs, whole_run_train_loss)


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
        require(self.hidden_size % self.num_heads == 0, "hidden_size", "must be divisible by num_heads")
        require(self.num_layers >= 1, "num_layers", "must be >= 1")


@dataclass
class PretrainConfig(TrainConfig):
    """Causal LM on the world's corpus (tiny world only): makes the `base` model."""

    epochs: float = 6.0
    lr: float = 3e-3
    warmup_ratio: float = 0.02
    batch_size: int = 32
    max_length: int = 64
    model: TinyModelConfig = field(default_factory=TinyModelConfig)


def inputs(cfg) -> dict:
    return {
        "tokenizer": tokenizer_source(cfg),
        "train": data_source(cfg, "pretrain_train"),
        "eval": data_source(cfg, "pretrain_eval"),
    }


def preflight(cfg) -> None:
    if cfg.pretrain.optimizer.name != "adamw":
        raise TaxfreeError(f"{cfg.source}: pretrain.optimizer.name: pretraining has no SFT/base pair to merge with; use adamw")


def section(cfg) -> dict:
    return {"pretrain": dataclasses.asdict(cfg.pretrain), "seed": cfg.seed}


def pack(texts: list[str], tokenizer, block: int) -> list[list[int]]:
    """Concatenate `text + eos` and cut into blocks of `block` tokens (the remainder is dropped)."""
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // block
    return [ids[i * block : (i + 1) * block] for i in range(n)]


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks):
        self.blocks = blocks

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        x = torch.tensor(self.blocks[i], dtype=torch.long)
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


def run(ctx) -> dict:
    from transformers import Trainer, TrainingArguments

    from taxfree.models import tiny_llama

    cfg, sec = ctx.cfg, ctx.cfg.pretrain
    preflight(cfg)
    _, tok_path = tokenizer_source(cfg)
    _, train_path = data_source(cfg, "pretrain_train")
    _, eval_path = data_source(cfg, "pretrain_eval")
    if train_path is None or eval_path is None:
        raise TaxfreeError(f"{cfg.source}: data.pretrain_train: pretraining needs a corpus (the tiny world or data.pretrain_train/pretrain_eval)")
    tokenizer = load_tokenizer(tok_path)
    require_eos(tokenizer, tok_path, "pretraining (it separates the packed documents)")
    train_blocks = pack([r["text"] for r in read_jsonl(train_path, "text")], tokenizer, sec.max_length)
    eval_blocks = pack([r["text"] for r in read_jsonl(eval_path, "text")], tokenizer, sec.max_length)
    if not train_blocks or not eval_blocks:
        raise TaxfreeError(f"{train_path}: corpus shorter than one block of {sec.max_length} tokens")

    m = sec.model
    model = tiny_llama(
        len(tokenizer),
        seed=cfg.seed,
        hidden_size=m.hidden_size,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        intermediate_size=m.intermediate_size,
        max_position_embeddings=max(m.max_position_embeddings, sec.max_length),
        tie_word_embeddings=m.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    args = TrainingArguments(**trainer_kwargs(sec, ctx.dir, cfg.seed))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_Blocks(train_blocks),
        eval_dataset=_Blocks(eval_blocks),
        callbacks=[tensorboard_callback(ctx.dir)],
    )
    before = evaluate_before_training(trainer, metric_key_prefix="eval_before")["eval_before_loss"]
    result = trainer.train(resume_from_checkpoint=last_checkpoint(ctx.dir))
    after = trainer.evaluate()["eval_loss"]
    save_model(trainer.model, tokenizer, ctx.dir / "model")
    return {
        "eval_loss_before": before,
        "eval_loss": after,
        "log_vocab": math.log(len(tokenizer)),
        "train_loss": whole_run_train_loss(trainer, result),
        "resumed_from_step": resumed_from_step(trainer),
        "steps": result.global_step,
        "train_blocks": len(train_blocks),
        "eval_blocks": len(eval_blocks),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


STAGE = Stage(
    name="pretrain",
    help="pretrain the tiny base model on the world's corpus",
    config=PretrainConfig,
    inputs=inputs,
    section=section,
    run=run,
    preflight=preflight,
    needs_eos=True,
    applies=lambda cfg: cfg.world.kind == "tiny" and cfg.models.base is None,
)

