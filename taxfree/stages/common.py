"""What the training stages share: Trainer arguments from a config section, the optimizer,
tensorboard, resuming, saving. No maths here."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from taxfree.atomic import atomic_dir
from taxfree.errors import TaxfreeError
from taxfree.pipeline.config import TrainConfig


def precision_flags(precision: str) -> dict:
    """`auto`: bf16 where the GPU supports it, else fp32 (TRL's bf16 default fails on CPU)."""
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if precision in ("bf16", "fp16") and not torch.cuda.is_available():
        raise TaxfreeError(f"precision {precision} needs a GPU; use precision: fp32 (or auto) on CPU")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def trainer_kwargs(section: TrainConfig, stage_dir: Path, seed: int) -> dict:
    """Keyword arguments shared by TrainingArguments and TRL's *Config classes."""
    opt = section.optimizer
    return dict(
        output_dir=str(stage_dir / "checkpoints"),
        num_train_epochs=section.epochs,
        max_steps=section.max_steps,
        learning_rate=section.lr,
        lr_scheduler_type=section.lr_scheduler,
        # transformers 5: a float in [0, 1) is a ratio of the total steps.
        warmup_steps=section.warmup_steps if section.warmup_steps > 0 else float(section.warmup_ratio),
        per_device_train_batch_size=section.batch_size,
        per_device_eval_batch_size=section.eval_batch_size,
        gradient_accumulation_steps=section.grad_accum,
        max_grad_norm=section.max_grad_norm,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.betas[0],
        adam_beta2=opt.betas[1],
        adam_epsilon=opt.eps,
        optim="adamw_torch",
        logging_steps=section.logging_steps,
        save_strategy="steps",
        save_steps=section.save_steps,
        save_total_limit=section.save_total_limit,
        eval_strategy="steps" if section.eval_steps > 0 else "no",
        eval_steps=section.eval_steps if section.eval_steps > 0 else None,
        # TRL defaults gradient checkpointing on; the config decides (off unless asked).
        activation_checkpointing=section.gradient_checkpointing,
        dataloader_pin_memory=torch.cuda.is_available(),
        dataloader_num_workers=section.dataloader_workers,
        report_to="none",
        seed=seed,
        data_seed=seed,
        disable_tqdm=False,
        save_only_model=False,
        **precision_flags(section.precision),
    )


def tensorboard_callback(stage_dir: Path):
    """Trainer logs go to <stage>/tb (transformers 5 dropped `logging_dir`)."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(stage_dir / "tb")))


def last_checkpoint(stage_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    ckpt = stage_dir / "checkpoints"
    if not ckpt.is_dir():
        return None
    return get_last_checkpoint(str(ckpt))


def build_stage_optimizer(model, section: TrainConfig, ref=None, base=None, seed: int = 0):
    """None for adamw (the Trainer builds torch AdamW from the same settings); our online merging
    optimizer otherwise, with tau = ref - base."""
    opt = section.optimizer
    if opt.name == "adamw":
        return None
    try:
        from taxfree.optim import build_optimizer
    except ImportError as e:  # pragma: no cover - the optimizers ship with the package
        raise TaxfreeError(f"optimizer {opt.name} is not available: {e}") from None
    if ref is None or base is None:
        raise TaxfreeError(f"optimizer {opt.name} needs a reference and a base model (optimizer.ref / optimizer.base)")
    return build_optimizer(
        model,
        opt.name,
        lr=section.lr,
        weight_decay=opt.weight_decay,
        betas=tuple(opt.betas),
        eps=opt.eps,
        reserve_p=opt.reserve_p,
        alpha=opt.alpha,
        use_merge=opt.use_merge,
        rescale=opt.rescale,
        online_step=opt.online_step,
        clip_tau=opt.clip_tau,
        ref=ref,
        base=base,
        seed=seed,
    )


def save_model(model, tokenizer, out_dir: Path) -> None:
    """Safetensors model + tokenizer, atomically (a killed save leaves no `model/`)."""
    with atomic_dir(out_dir, overwrite=True) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
            _classic_tokenizer_class(tmp)


def _classic_tokenizer_class(path: Path) -> None:
    """Keep checkpoints loadable by transformers 4 (see taxfree.data.tokenizer)."""
    import json

    cfg_path = Path(path) / "tokenizer_config.json"
    if not cfg_path.is_file():
        return
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if cfg.get("tokenizer_class") in ("TokenizersBackend", None):
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def finite(x) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def section_dict(section) -> dict:
    return dataclasses.asdict(section)
