"""What the training stages share: Trainer arguments from a config section, the optimizer,
tensorboard, resuming, saving. No maths here."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from taxfree.atomic import atomic_dir
from taxfree.errors import TaxfreeError
from taxfree.distributed import ranks
from taxfree.pipeline.train_config import TrainConfig, settings_of


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
        **deepspeed_cpu_kwargs(),
    )


def loaded_partitioned(model) -> bool:
    """Whether from_pretrained built the model already partitioned by DeepSpeed ZeRO-3
    (zero3_init_flag): its parameters are then DeepSpeed's, each rank holding a slice."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def deepspeed_launch() -> bool:
    """True in a process started by `accelerate launch` with a DeepSpeed config (configs/accelerate/zero*.yaml)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def deepspeed_cpu_kwargs() -> dict:
    """What a DeepSpeed launch needs to run in CPU processes (no GPU: tests, debugging); {} elsewhere.

    - `use_cpu=True`: the process group is gloo's. Without it accelerate 1.15 finds no backend for a
      DeepSpeed process without a GPU and takes every process for rank 0 of a world of one (DeepSpeed
      then stops: "train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size").
    - ACCELERATE_USE_CPU=true is refused: accelerate then drops DeepSpeed silently and trains as DDP.
    - DeepSpeed's communication setup probes every op of its own for compatibility (compiler runs)
      and JIT-builds a shared-memory all-reduce for the CPU (minutes; only its inference all-reduce
      uses it): no op is marked compatible, so nothing is compiled and collectives go through gloo.
    """
    if not deepspeed_launch() or torch.cuda.is_available():
        return {}
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        raise TaxfreeError("ACCELERATE_USE_CPU=true with a DeepSpeed launch: accelerate would train without DeepSpeed "
                           "(as DDP); unset it, DeepSpeed runs on CPU processes without it")
    import deepspeed.ops

    if "__compatible_ops__" not in vars(deepspeed.ops):  # not probed yet (deepspeed.ops computes it on first access)
        deepspeed.ops.__compatible_ops__ = {}
    return {"use_cpu": True}


def evaluate_before_training(trainer, **kwargs) -> dict:
    """`trainer.evaluate(**kwargs)` on the model as loaded, before `train()`, under every backend.

    Under DeepSpeed transformers evaluates a model not yet trained through a ZeRO inference
    engine. ZeRO-1/2 have none ("ZeRO inference only makes sense with ZeRO Stage 3"): their
    model is whole on every rank, so it is evaluated as under DDP. Under ZeRO-3 the inference
    engine would then be taken by `train()` for its own (it wraps nothing more and fails at the
    first backward): the engine is taken apart after the evaluation, so that `train()` builds
    the training engine (with the ZeRO optimizer) as it does without an evaluation before.
    """
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return trainer.evaluate(**kwargs)
    if not trainer.accelerator.state.deepspeed_plugin.hf_ds_config.is_zero3():
        trainer.is_deepspeed_enabled = False
        try:
            return trainer.evaluate(**kwargs)
        finally:
            trainer.is_deepspeed_enabled = True
    metrics = trainer.evaluate(**kwargs)
    engine = trainer.model_wrapped
    if engine is not trainer.model:
        engine.destroy()  # its ZeRO-3 hooks on the model's modules; the parameters stay partitioned
        trainer.model_wrapped = trainer.model
        trainer.deepspeed = None
    return metrics


def tensorboard_callback(stage_dir: Path):
    """Trainer logs go to <stage>/tb (transformers 5 dropped `logging_dir`); rank 0 logs, alone."""
    from transformers import TrainerCallback

    if not ranks().main:
        return TrainerCallback()
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    class _OneLog(TensorBoardCallback):
        """transformers closes the writer when train() ends and opens a new one, in
        <output_dir>/runs/<date>_<host>, for an evaluation after it: kept open here, so those
        metrics land in <stage>/tb as well (each log is flushed)."""

        def on_train_end(self, args, state, control, **kwargs):
            if self.tb_writer is not None:
                self.tb_writer.flush()

    return _OneLog(tb_writer=SummaryWriter(log_dir=str(stage_dir / "tb")))


def resumed_from_step(trainer) -> int:
    """The step the last `train()` call started from: 0 for a fresh run, N after a resume from
    checkpoint-N (recorded in the manifest, so a result says it was resumed)."""
    return int(getattr(trainer, "_initial_global_step", 0) or 0)


def whole_run_train_loss(trainer, result) -> float:
    """Mean training loss over every step of the run, also when it resumed from a checkpoint.

    transformers averages only the steps trained in the call that finished, so a resumed run
    would report a different train_loss than an uninterrupted one; the steps before the resume
    are in the checkpoint's log history, one entry per logging window. Exact when save_steps is
    a multiple of logging_steps; otherwise the unlogged steps just before the checkpoint are left
    out of the mean (their losses were never recorded).
    """
    start = resumed_from_step(trainer)
    done = trainer.state.global_step - start
    if start <= 0 or done <= 0:
        return result.training_loss
    before, logged = 0.0, 0
    for entry in trainer.state.log_history:
        step = entry.get("step")
        if "loss" in entry and isinstance(step, int) and logged < step <= start:
            before += entry["loss"] * (step - logged)
            logged = step
    return (before + result.training_loss * done) / (logged + done)


def build_stage_optimizer(model, section: TrainConfig, ref=None, base=None, seed: int = 0):
    """None for adamw (the Trainer builds torch AdamW from the same settings); otherwise the
    registry's optimizer with its own hyperparameters from the section, and for a merging one
    tau = ref - base."""
    opt = section.optimizer
    if opt.name == "adamw":
        return None
    from taxfree.optim import build_optimizer
    from taxfree.optim.registry import optimizer_spec

    if optimizer_spec(opt.name).merging and (ref is None or base is None):
        raise TaxfreeError(f"optimizer {opt.name} needs a reference and a base model (optimizer.ref / optimizer.base)")
    return build_optimizer(
        model,
        opt.name,
        lr=section.lr,
        ref=ref,
        base=base,
        seed=seed,
        # Under DeepSpeed each rank builds tau only for the partition it owns, at the first step.
        defer_tau=deepspeed_launch(),
        **settings_of(opt),
    )


def save_model(model, tokenizer, out_dir: Path, trainer=None) -> None:
    """Safetensors model + tokenizer, atomically (a killed save leaves no `model/`).

    With `trainer` (call it on every rank): the full weights are gathered from the shards
    (FSDP full state dict, ZeRO-3 16-bit gather; a collective) and rank 0 alone writes them.
    """
    r = ranks()
    state_dict = None
    if trainer is not None and r.world > 1:
        state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if r.main:
        with atomic_dir(out_dir, overwrite=True) as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
                _classic_tokenizer_class(tmp)
    r.barrier()


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


def _token_count(tokenizer, prompt, completion=None) -> int:
    """Tokens of prompt (+ completion) as the trainers see them: chat messages through the chat
    template, strings as they are."""
    if isinstance(prompt, list):
        messages = list(prompt) + (list(completion) if isinstance(completion, list) else
                                   [{"role": "assistant", "content": completion}] if completion is not None else [])
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=completion is None)
        else:
            text = "\n".join(m["content"] for m in messages)
    else:
        text = prompt + (completion if isinstance(completion, str) else "")
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_lengths(path: str, records: list[dict], tokenizer, key: str, max_length: int,
                  max_prompt_length: int | None = None) -> None:
    """With `<key>.truncation: false`, an example the trainer would cut is an error naming it.

    TRL truncates silently (keeping the start), so a prompt longer than max_length trains on a
    response cut to nothing; this makes that a stop instead.
    """
    hint = f"(truncation is off: shorten it, raise {key}.max_length, or set {key}.truncation: true)"
    for i, r in enumerate(records, start=1):
        if "messages" in r:
            pairs = [(r["messages"][:-1], r["messages"][-1:])]
        elif "chosen" in r:
            pairs = [(r["prompt"], r["chosen"]), (r["prompt"], r["rejected"])]
        else:
            pairs = [(r["prompt"], r.get("completion"))]
        prompt = pairs[0][0]
        if max_prompt_length is not None:
            n = _token_count(tokenizer, prompt)
            if n > max_prompt_length:
                raise TaxfreeError(f"{path}: record {i}: the prompt is {n} tokens, longer than "
                                   f"{key}.max_prompt_length = {max_prompt_length} {hint}")
        n = max(_token_count(tokenizer, p, c) for p, c in pairs)
        if n > max_length:
            raise TaxfreeError(f"{path}: record {i}: {n} tokens, longer than {key}.max_length = {max_length} {hint}")
