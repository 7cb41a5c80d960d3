"""Step time and optimizer state of the online merging optimizers under DeepSpeed ZeRO-2,
against DeepSpeed's own AdamW and torch's AdamW (fused and foreach) in the same run.

Two data-parallel processes on gloo (CPU; `--backend nccl` on a 2-GPU node) hold the same
Llama-shaped parameters with gradients that change every step (the loss is sum(p * G_s) for a
cycle of --grad-sets random sets G_s: with one fixed G, Adam's |D| would tie everywhere, which
no training run sees after its first steps). Each row is one ZeRO-2 engine over the same model,
stepped `--steps` times after `--warmup`:

- DeepSpeed AdamW: the config's {"optimizer": {"type": "AdamW"}}. On CPU that is DeepSpeed's
  FusedAdam built for the CPU accelerator (JIT-compiled once, cached in ~/.cache/torch_extensions);
  `--torch-adam` takes DeepSpeed's torch.optim.AdamW path instead (no compiling).
- torch.optim.AdamW with fused=True and with foreach=True, handed to DeepSpeed as the client
  optimizer (ZeRO's basic optimizer, as ours are).
- OnDARE-AdamW and OnTIES-AdamW as ZeRO's basic optimizer, at the authors' DPO settings
  (reserve_p 0.01, alpha 1e-7, use_merge).

Reported (median over steps, the slower rank): the basic optimizer's step on the rank's flat
partition, the whole `engine.step()` (that step plus ZeRO's all-gather of the updated weights),
and optimizer state bytes per model parameter on one rank (the larger) and over all ranks.

    python bench/optimizer_deepspeed.py                       # ~50M parameters, 2 CPU processes
    python bench/optimizer_deepspeed.py --threads 1 --clock cpu --torch-adam
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from optimizer_step import decoder_shapes, state_bytes  # noqa: E402

WORLD = 2


class FixedGradients(torch.nn.Module):
    """Parameters of the given shapes; loss = sum(p * G_s) so each backward leaves grad = G_s,
    s = the `step` attribute modulo the number of gradient sets."""

    def __init__(self, shapes: dict, seed: int = 0, sets: int = 2):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.names = list(shapes)
        self.weights = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes.values()
        )
        self.grads = [[torch.randn(s, generator=g) * 1e-3 for s in shapes.values()] for _ in range(sets)]
        self.step = 0

    def forward(self, _):
        grads = self.grads[self.step % len(self.grads)]
        return sum((w * g).sum() for w, g in zip(self.weights, grads))


def _config(optimizer: dict | None) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 2, "contiguous_gradients": True},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    if optimizer is not None:
        config["optimizer"] = optimizer
    return config


FUSED = "torch.optim.AdamW (fused)"


def _rows(args) -> list[tuple[str, str]]:
    adamw = "DeepSpeed AdamW (torch.optim.AdamW)" if args.torch_adam else "DeepSpeed AdamW (FusedAdam)"
    return [
        (adamw, "adamw"),
        (FUSED, "torch-fused"),
        ("torch.optim.AdamW (foreach)", "torch-foreach"),
        (f"OnDARE-AdamW q={args.reserve_p}", "ondare"),
        (f"OnTIES-AdamW q={args.reserve_p}", "onties"),
    ]


def _worker(rank: int, args, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if args.backend == "gloo":
        os.environ["DS_ACCELERATOR"] = "cpu"
    else:
        torch.cuda.set_device(rank)
    if args.threads:
        torch.set_num_threads(args.threads)
    import deepspeed
    import deepspeed.ops

    if args.backend == "gloo":  # no JIT build of DeepSpeed's shm all-reduce: gloo's
        deepspeed.ops.__compatible_ops__ = {}
    deepspeed.init_distributed(dist_backend=args.backend)
    from deepspeed.accelerator import get_accelerator

    from taxfree.optim import OnDAREAdamW, OnTIESAdamW

    device = get_accelerator().current_device_name()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    shapes = decoder_shapes(args.params, args.hidden)
    results = {}
    for label, kind in _rows(args):
        model = FixedGradients(shapes, sets=args.grad_sets).to(device)
        model.grads = [[g.to(device) for g in grads] for grads in model.grads]
        n_params = sum(p.numel() for p in model.parameters())
        if kind == "adamw":
            params = {"lr": 1e-6, "weight_decay": 0.0, "torch_adam": bool(args.torch_adam)}
            engine, *_ = deepspeed.initialize(
                model=model, model_parameters=model.parameters(),
                config=_config({"type": "AdamW", "params": params}),
            )
        elif kind.startswith("torch-"):
            variant = {"fused": True} if kind == "torch-fused" else {"foreach": True}
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0, **variant)
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=_config(None))
        else:
            cls = OnDAREAdamW if kind == "ondare" else OnTIESAdamW
            named = [(n, p) for n, p in zip(model.names, model.weights)]
            optimizer = cls(named, lr=1e-6, reserve_p=args.reserve_p, alpha=args.alpha, use_merge=True)
            ref = {n: p.detach() + 1e-3 * torch.randn_like(p) for n, p in named}
            # deferred: each rank builds only its partition's tau (no full-model tau at any time)
            optimizer.init_ref_param_diff(ref, dict(named), defer=True)
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=_config(None))
            del ref
        basic = engine.optimizer.optimizer
        inner_times: list[float] = []
        inner_step = basic.step

        def timed_step(*a, _inner=inner_step, **kw):
            start = clock()
            out = _inner(*a, **kw)
            inner_times.append(clock() - start)
            return out

        basic.step = timed_step
        engine_times = []
        x = torch.zeros(1, device=device)
        for i in range(args.warmup + args.steps):
            model.step = i
            engine.backward(engine(x))
            get_accelerator().synchronize()
            start = clock()
            engine.step()
            get_accelerator().synchronize()
            if i >= args.warmup:
                engine_times.append(clock() - start)
        state = state_bytes(basic)
        partition = sum(p.numel() for g in basic.param_groups for p in g["params"])
        results[label] = {
            "optimizer_step": statistics.median(inner_times[args.warmup :]),
            "engine_step": statistics.median(engine_times),
            "state_bytes": state,
            "partition": partition,
            "n_params": n_params,
        }
        del engine, basic, model
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=float, default=5e7, help="about this many parameters")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reserve-p", type=float, default=0.01)
    parser.add_argument("--alpha", type=float, default=1e-7)
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    parser.add_argument("--grad-sets", type=int, default=2, help="gradient sets cycled over the steps")
    parser.add_argument("--torch-adam", action="store_true",
                        help="DeepSpeed's torch.optim.AdamW path instead of its FusedAdam")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (0: default)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: process CPU time, steadier on a shared machine (use --threads 1)")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(args, port, out), nprocs=WORLD, join=True)
        ranks = [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    rows = _rows(args)
    first = ranks[0][rows[0][0]]
    print(f"\nDeepSpeed ZeRO-2, {WORLD} processes ({args.backend}), {first['n_params'] / 1e6:.1f}M fp32 "
          f"parameters, {first['partition'] / 1e6:.1f}M per rank; {platform.processor() or platform.machine()}, "
          f"{args.threads or torch.get_num_threads()} threads per process, torch {torch.__version__}, "
          f"{args.clock} clock, median of {args.steps} steps, slower rank\n")
    print("| optimizer | optimizer step (ms) | x DeepSpeed AdamW | x torch fused AdamW | engine.step (ms) "
          "| x DeepSpeed AdamW | x torch fused AdamW | state bytes / model param, one rank | all ranks |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    base_opt = max(r[rows[0][0]]["optimizer_step"] for r in ranks)
    base_engine = max(r[rows[0][0]]["engine_step"] for r in ranks)
    fused_opt = max(r[FUSED]["optimizer_step"] for r in ranks)
    fused_engine = max(r[FUSED]["engine_step"] for r in ranks)
    for label, _ in rows:
        opt_step = max(r[label]["optimizer_step"] for r in ranks)
        engine_step = max(r[label]["engine_step"] for r in ranks)
        one_rank = max(r[label]["state_bytes"] for r in ranks) / first["n_params"]
        summed = sum(r[label]["state_bytes"] for r in ranks) / first["n_params"]
        print(f"| {label} | {opt_step * 1e3:.1f} | {opt_step / base_opt:.2f} | {opt_step / fused_opt:.2f} | "
              f"{engine_step * 1e3:.1f} | {engine_step / base_engine:.2f} | {engine_step / fused_engine:.2f} | "
              f"{one_rank:.2f} | {summed:.2f} |")


if __name__ == "__main__":
    main()
