"""Steps/s of the align stage's DPO training path against TRL's DPOTrainer called directly.

The stage builds its DPOTrainer in `taxfree.stages.align._trainer` (arguments from
`taxfree.stages.common.trainer_kwargs`, the tensorboard and LastLogs callbacks of
`train_variant`); this bench runs exactly that construction and, in the same process, a plain
`trl.DPOTrainer` with a plain `DPOConfig` (bf16 off, gradient checkpointing off, the same batch
size, lr, max_length, beta and seed), on the same tiny Llama and the same tiny-world preference
pairs, alternating the order between repeats. Steps/s is measured between the ends of steps
after `--warmup` steps (training loop only: no construction, tokenisation or final save).

The same comparison with `optimizer: ondare` (our OnDAREAdamW passed through `optimizers=`)
against TRL with its own default AdamW is reported separately: that ratio is the optimizer's
cost, not the stage's overhead.

    OMP_NUM_THREADS=1 python bench/stage_overhead.py             # ~3 min on 2 CPU cores
    python bench/stage_overhead.py --steps 60 --repeats 7 --clock cpu --hidden 256 --layers 4
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import yaml  # noqa: E402
from transformers import TrainerCallback  # noqa: E402


class StepClock(TrainerCallback):
    """Wall time at the end of every optimizer step (the Trainer's loop, callbacks included)."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.ends: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.ends = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(self.clock())

    def steps_per_s(self, warmup: int) -> float:
        timed = self.ends[warmup:]
        if len(timed) < 2:
            raise SystemExit(f"error: --steps must exceed --warmup + 1 (got {len(self.ends)} steps, warmup {warmup})")
        return (len(timed) - 1) / (timed[-1] - timed[0])


def build_inputs(root: Path, args) -> dict:
    """Tiny world (pairs + tokenizer), a random tiny Llama as the SFT model and a perturbed copy as base."""
    from taxfree.data.tiny_world import build_tiny_world, world_files
    from taxfree.models import tiny_llama
    from taxfree.models.load import load_tokenizer

    world = root / "world"
    build_tiny_world(world, seed=0, num_entities=24, corpus_repeats=1, max_operand=9, sft_examples=32,
                     pref_pairs=args.pairs, eval_prompts=8, eval_items=8, vocab_size=256)
    files = world_files(world)
    tok = load_tokenizer(str(files.tokenizer))
    model = tiny_llama(len(tok), seed=0, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                       intermediate_size=2 * args.hidden, pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    sft_dir, base_dir = root / "sft", root / "base"
    model.save_pretrained(str(sft_dir))
    tok.save_pretrained(str(sft_dir))
    with torch.no_grad():  # tau = sft - base must be non-zero for OnDARE to have work to do
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    model.save_pretrained(str(base_dir))
    config = {
        "name": "bench",
        "seed": 0,
        "run_dir": str(root / "runs"),
        "world": {"kind": "none"},
        "models": {"sft": str(sft_dir), "base": str(base_dir), "tokenizer": str(files.tokenizer)},
        "data": {"pref_train": str(files.pref_train), "pref_eval": str(files.pref_eval)},
        "align": {"methods": ["dpo"], "optimizers": ["adamw"], "max_steps": args.steps, "lr": args.lr,
                  "batch_size": args.batch_size, "max_length": args.max_length,
                  "max_prompt_length": args.max_length // 2, "beta": args.beta},
    }
    path = root / "bench.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return {"config": path, "sft": str(sft_dir), "base": str(base_dir), "tokenizer": str(files.tokenizer)}


def run_ours(inputs: dict, optimizer_name: str, work: Path, warmup: int, clock) -> float:
    """The align stage's construction (train_variant minus the final evaluate and save)."""
    import dataclasses

    from taxfree.models.load import load_causal_lm, load_tokenizer
    from taxfree.pipeline.config import load_config
    from taxfree.stages import align
    from taxfree.stages.callbacks import LastLogs
    from taxfree.stages.common import build_stage_optimizer, tensorboard_callback

    cfg = load_config(inputs["config"])
    tokenizer = load_tokenizer(inputs["tokenizer"])
    model = load_causal_lm(inputs["sft"])
    ref_model = load_causal_lm(inputs["sft"])
    train, evald = align._datasets(cfg, "dpo")
    sec = dataclasses.replace(cfg.align, optimizer=dataclasses.replace(cfg.align.optimizer, name=optimizer_name))
    optimizer = None
    if optimizer_name != "adamw":
        optimizer = build_stage_optimizer(model, sec, ref=inputs["sft"], base=inputs["base"], seed=cfg.seed)
    timer = StepClock(clock)
    vdir = work / f"ours-{optimizer_name}"
    trainer = align._trainer(cfg, "dpo", model, ref_model, tokenizer, train, evald, optimizer, vdir,
                             [tensorboard_callback(vdir), LastLogs(), timer])
    trainer.train()
    return timer.steps_per_s(warmup)


def run_trl(inputs: dict, args, work: Path, warmup: int, clock) -> float:
    """TRL's DPOTrainer with a plain DPOConfig and its default optimizer."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from taxfree.data.records import read_jsonl
    from taxfree.models.load import load_causal_lm, load_tokenizer
    from taxfree.pipeline.config import load_config

    cfg = load_config(inputs["config"])
    tokenizer = load_tokenizer(inputs["tokenizer"])
    model = load_causal_lm(inputs["sft"])
    ref_model = load_causal_lm(inputs["sft"])
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in read_jsonl(cfg.data.pref_train, "pref")]
    config = DPOConfig(output_dir=str(work / "trl"), bf16=False, gradient_checkpointing=False,
                       per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
                       max_length=args.max_length, beta=args.beta, max_steps=args.steps, seed=cfg.seed)
    timer = StepClock(clock)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    return timer.steps_per_s(warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per training run")
    parser.add_argument("--warmup", type=int, default=5, help="steps not timed at the start of each run")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each variant, order alternating")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time, or this process's CPU time (steadier on a shared machine)")
    parser.add_argument("--pairs", type=int, default=256, help="preference pairs in the tiny world")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--no-ondare", action="store_true", help="skip the optimizer comparison")
    args = parser.parse_args()
    if args.steps <= args.warmup + 1:
        parser.error("--steps must exceed --warmup + 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    variants = ["ours-adamw", "trl-adamw"] + ([] if args.no_ondare else ["ours-ondare"])
    results: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="taxfree-stage-overhead-") as tmp:
        root = Path(tmp)
        inputs = build_inputs(root, args)
        for r in range(args.repeats):
            order = variants if r % 2 == 0 else list(reversed(variants))
            for v in order:
                work = root / f"r{r}"
                if v == "trl-adamw":
                    sps = run_trl(inputs, args, work, args.warmup, clock)
                else:
                    sps = run_ours(inputs, v.split("-", 1)[1], work, args.warmup, clock)
                results[v].append(sps)
                print(f"repeat {r + 1}/{args.repeats} {v}: {sps:.2f} steps/s", flush=True)

    report(args, results, variants)


LABELS = {"ours-adamw": "align stage (ours), adamw", "trl-adamw": "TRL DPOTrainer, its default AdamW",
          "ours-ondare": "align stage (ours), ondare"}


def report(args, results: dict[str, list[float]], variants: list[str]) -> None:
    """A plain table, then the same as a markdown snippet for docs/benchmarks.md."""
    med = {v: statistics.median(xs) for v, xs in results.items()}
    trl = results["trl-adamw"]
    # Time per step relative to TRL: ratio of medians, and the median of the ratios within each
    # repeat (the runs of one repeat are adjacent in time, so they share the machine's load).
    vs_trl = {v: med["trl-adamw"] / med[v] for v in variants}
    paired = {v: statistics.median(t / x for t, x in zip(trl, results[v])) for v in variants}
    setup = (f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} thread(s); tiny Llama hidden "
             f"{args.hidden} x {args.layers} layers, batch {args.batch_size}, max_length {args.max_length}; "
             f"{args.steps} steps ({args.warmup} untimed) per run, {args.repeats} repeats, {args.clock} clock")
    print()
    print(setup)
    width = max(len(LABELS[v]) for v in variants)
    print(f"{'run':<{width}}  {'median steps/s':>14}  {'time/step vs TRL':>16}  {'paired':>7}  repeats")
    for v in variants:
        xs = " ".join(f"{x:.2f}" for x in results[v])
        print(f"{LABELS[v]:<{width}}  {med[v]:>14.2f}  {vs_trl[v]:>15.3f}x  {paired[v]:>6.3f}x  {xs}")
    overhead = vs_trl["ours-adamw"] - 1
    lines = [f"stage overhead (ours adamw vs TRL): {100 * overhead:+.1f}% time per step "
             f"({'within' if overhead <= 0.05 else 'OVER'} the 5% goal; paired {100 * (paired['ours-adamw'] - 1):+.1f}%)"]
    if "ours-ondare" in med:
        lines.append(f"optimizer cost (ours ondare vs TRL's AdamW): {100 * (vs_trl['ours-ondare'] - 1):+.1f}% time per step; "
                     f"vs our adamw: {100 * (med['ours-adamw'] / med['ours-ondare'] - 1):+.1f}%")
    print("\n".join(lines))
    print()
    print("markdown:")
    print()
    print(setup + ".")
    print()
    print("| run | median steps/s | time per step vs TRL (ratio of medians) | median of per-repeat ratios |")
    print("|---|---:|---:|---:|")
    for v in variants:
        print(f"| {LABELS[v]} | {med[v]:.2f} | {vs_trl[v]:.3f}x | {paired[v]:.3f}x |")
    print()
    for line in lines:
        print(f"- {line}")


if __name__ == "__main__":
    main()
