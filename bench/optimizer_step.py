"""Step time and state memory of the online merging optimizers against torch.optim.AdamW.

One run, the same parameters and gradients for every optimizer: torch.optim.AdamW with
fused=True (one kernel over p, g, m, v: the transformers Trainer's default where available) and
with foreach=True, OnDARE-AdamW and OnTIES-AdamW (the authors' DPO settings by default:
reserve_p 0.01, alpha 1e-7, use_merge), and the straightforward per-parameter loop written from
the spec (taxfree.optim.reference) for both. The gradients change every step (a cycle of
--grad-sets random sets, the same for every optimizer): with one fixed gradient Adam's |D| is
lr up to rounding everywhere, a tie at every entry, which no training run sees after its first
steps. Each round steps every fast row once, each right after a fused AdamW step, and a row's
ratio to fused AdamW is the median over rounds of its step over that fused step (a shared
machine's load drifts; adjacent steps see the same load, and every row starts from the same
cache state). All fast rows are built at once (5 optimizers' state, about 40 bytes per
parameter, plus parameters and gradient sets: size --params to the device). Prints a markdown
table: median step time, ratios to fused and foreach AdamW and to the per-parameter loop,
optimizer state bytes per parameter.

    python bench/optimizer_step.py --threads 1 --clock cpu            # ~50M parameters on CPU
    python bench/optimizer_step.py --device cuda --params 1e9 --hidden 4096
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time

import torch

from taxfree.optim import OnDAREAdamW, OnTIESAdamW, cpu_kernel
from taxfree.optim.reference import ReferenceOnlineMergingAdamW


def decoder_shapes(n_params: float, hidden: int) -> dict[str, tuple[int, ...]]:
    """Llama-like layers (q, k, v, o, gate, up, down, 2 norms) until about n_params."""
    ffn = 4 * hidden
    per_layer = 4 * hidden * hidden + 3 * hidden * ffn + 2 * hidden
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(max(1, round(n_params / per_layer))):
        prefix = f"model.layers.{layer}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{prefix}.self_attn.{name}.weight"] = (hidden, hidden)
        shapes[f"{prefix}.mlp.gate_proj.weight"] = (ffn, hidden)
        shapes[f"{prefix}.mlp.up_proj.weight"] = (ffn, hidden)
        shapes[f"{prefix}.mlp.down_proj.weight"] = (hidden, ffn)
        shapes[f"{prefix}.input_layernorm.weight"] = (hidden,)
        shapes[f"{prefix}.post_attention_layernorm.weight"] = (hidden,)
    return shapes


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.dim() > 0:
                total += value.numel() * value.element_size()
    return total


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(optimizer, params, grad_sets, device, steps: int, warmup: int, clock) -> list[float]:
    times = []
    for i in range(warmup + steps):
        for p, g in zip(params, grad_sets[i % len(grad_sets)]):
            p.grad = g
        sync(device)
        start = clock()
        optimizer.step()
        sync(device)
        if i >= warmup:
            times.append(clock() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--params", type=float, default=5e7, help="about this many parameters")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=15,
                        help="timed rounds: in each, every optimizer takes one step in turn")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reference-steps", type=int, default=2)
    parser.add_argument("--reserve-p", type=float, default=0.01)
    parser.add_argument("--alpha", type=float, default=1e-7)
    parser.add_argument("--no-reference", action="store_true", help="skip the per-parameter loops")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: process CPU time, steadier on a shared machine (use --threads 1)")
    parser.add_argument("--grad-sets", type=int, default=3, help="gradient sets cycled over the steps")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shapes = decoder_shapes(args.params, args.hidden)
    g = torch.Generator(device=device).manual_seed(0)
    params = {
        n: torch.nn.Parameter(torch.randn(s, generator=g, device=device, dtype=dtype) * 0.02)
        for n, s in shapes.items()
    }
    grad_sets = [[torch.randn(p.shape, generator=g, device=device, dtype=dtype) * 1e-3 for p in params.values()]
                 for _ in range(max(1, args.grad_sets))]
    n_params = sum(p.numel() for p in params.values())
    base = {n: p.detach() for n, p in params.items()}
    ref = {n: p.detach() + 1e-3 * torch.randn(p.shape, generator=g, device=device, dtype=dtype)
           for n, p in params.items()}
    merge = dict(reserve_p=args.reserve_p, alpha=args.alpha, use_merge=True)

    def adamw(**kind):
        def build():
            return torch.optim.AdamW(params.values(), lr=1e-6, weight_decay=0.0, **kind)
        return build

    def merging(cls, **extra):
        def build():
            opt = cls(params.items(), lr=1e-6, **merge, **extra)
            opt.init_ref_param_diff(ref, base)
            return opt
        return build

    def reference(method):
        def build():
            opt = ReferenceOnlineMergingAdamW(params.values(), method, lr=1e-6, **merge)
            for n, p in params.items():  # the spec's dense tau (its values do not change timing)
                opt.set_tau(p, ref[n] - base[n])
            return opt
        return build

    fused_label, foreach_label = "torch.optim.AdamW (fused)", "torch.optim.AdamW (foreach)"
    rows = [
        (fused_label, adamw(fused=True), args.steps),
        (foreach_label, adamw(foreach=True), args.steps),
        (f"OnDARE-AdamW q={args.reserve_p}", merging(OnDAREAdamW), args.steps),
        (f"OnTIES-AdamW q={args.reserve_p}", merging(OnTIESAdamW), args.steps),
        (f"OnDARE-AdamW q={args.reserve_p} rescale", merging(OnDAREAdamW, rescale=True), args.steps),
        (f"OnTIES-AdamW q={args.reserve_p} rescale", merging(OnTIESAdamW, rescale=True), args.steps),
    ]
    if not args.no_reference:
        rows += [
            ("per-parameter loop, OnDARE", reference("ondare"), args.reference_steps),
            ("per-parameter loop, OnTIES", reference("onties"), args.reference_steps),
        ]

    # Each round steps every fast row once, each right after a fused AdamW step on the same
    # parameters: every row starts from the same cache state (after foreach AdamW's large
    # temporaries a step starts cold), and its ratio to fused AdamW is the median over rounds of
    # its step over the fused step just before it (a shared machine's load drifts; adjacent steps
    # see the same load). The slow per-parameter loops afterwards, one at a time.
    fast = [(label, build) for label, build, _ in rows if "loop" not in label]
    built = {label: build() for label, build in fast}
    times: dict[str, list[float]] = {label: [] for label, _ in fast}
    before: dict[str, list[float]] = {label: [] for label, _ in fast}  # the fused step before each
    plist = list(params.values())
    others = [label for label in built if label != fused_label]
    for step in range(args.warmup + args.steps):
        sets = grad_sets[step % len(grad_sets):] + grad_sets
        for label in others[step % len(others):] + others[: step % len(others)]:
            fused_seconds = time_steps(built[fused_label], plist, sets, device, 1, 0, clock)[0]
            times[fused_label].append(fused_seconds)
            before[label].append(fused_seconds)
            times[label] += time_steps(built[label], plist, sets, device, 1, 0, clock)
    per_param = {label: state_bytes(opt) / n_params for label, opt in built.items()}
    del built
    gc.collect()
    for label, build, steps in rows:
        if "loop" in label:
            optimizer = build()
            times[label] = time_steps(optimizer, plist, grad_sets, device, steps, 1, clock)
            per_param[label] = state_bytes(optimizer) / n_params
            del optimizer
            gc.collect()
    skip = {label: args.warmup * (len(others) if label == fused_label else 1) for label in times}
    for label in times:
        if "loop" not in label:
            times[label] = times[label][skip[label]:]
            before[label] = before[label][args.warmup:]
    results = {label: (statistics.median(times[label]), per_param[label]) for label, _, _ in rows}

    def paired(label: str, base: str) -> float:
        """Against fused AdamW: the median of the ratios to the fused step just before; else
        the ratio of medians."""
        if label == base:
            return 1.0
        if base == fused_label and label in before:
            return statistics.median(a / b for a, b in zip(times[label], before[label]))
        return results[label][0] / results[base][0]

    loops = {"OnDARE": "per-parameter loop, OnDARE", "OnTIES": "per-parameter loop, OnTIES"}
    kernel = "fused CPU pass (taxfree.optim.cpu_kernel)" if device.type == "cpu" and cpu_kernel.kernel() else "torch ops"
    print(f"\n{n_params / 1e6:.1f}M parameters in {len(shapes)} tensors, {args.dtype}, "
          f"device {device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}, {args.clock} clock, "
          f"median of {args.steps} rounds, each row after a fused AdamW step ({args.reference_steps} steps "
          f"for the loops), "
          f"{len(grad_sets)} gradient sets; merging optimizers' Adam part: {kernel}\n")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB\n")
    print("| optimizer | step (ms) | x fused AdamW | x foreach AdamW | x per-parameter loop | state bytes / param |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, (seconds, per_param) in results.items():
        loop = next((loops[k] for k in loops if label.startswith(k)), None)
        vs_loop = f"{paired(label, loop):.3f}" if loop in results else ""
        print(f"| {label} | {seconds * 1e3:.1f} | {paired(label, fused_label):.2f} | "
              f"{paired(label, foreach_label):.2f} | {vs_loop} | {per_param:.2f} |")


if __name__ == "__main__":
    main()
