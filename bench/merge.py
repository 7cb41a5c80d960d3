"""Benchmark: streaming merge vs loading both models with transformers, vs copying the bytes.

Builds two synthetic Llama-shaped checkpoints (about 1.07 GB each in bf16 by default, sharded
like real ones) under a temporary directory in /tmp, then runs each method in a fresh child
process and reports its wall time and peak RSS (VmHWM of the child, reset after its imports;
the RSS right after the imports, about 0.25 GB for torch, is reported separately):

  taxfree       taxfree.merging.merge_checkpoints, aligned weight 0.5
  transformers  AutoModelForCausalLM.from_pretrained twice, average the state dicts in float32,
                save_pretrained (what a merge script usually does)
  copy          read both inputs and write one output's worth of bytes: the I/O a merge must do
  cp            shutil.copytree of one checkpoint (read 1x, write 1x)

Inputs are in the page cache (just written); outputs go to disk through it, and `sync` runs
before each child. Times are the best of --repeat runs, the order of methods rotating between
repeats (on a shared machine, write throughput varies several-fold from run to run).
Usage: python bench/merge.py [--dtype bfloat16|float32] [--layers 8] [--repeat 3] [--out-root /dev/shm]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def make_checkpoint(path: Path, seed: int, dtype_name: str, layers: int) -> dict:
    """A Llama config and random tensors, written a chunk at a time (never a whole model in memory)."""
    import torch
    from transformers import LlamaConfig

    from taxfree.merging.checkpoint import ShardedWriter, TensorInfo

    dtype = getattr(torch, dtype_name)
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False, dtype=dtype_name)
    path.mkdir(parents=True)
    config.save_pretrained(path)
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes = {"model.embed_tokens.weight": (v, h)}
    for layer in range(layers):
        p = f"model.layers.{layer}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{n}.weight"] = (h, h)
        shapes.update({p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    infos = [TensorInfo(n, dtype, s) for n, s in shapes.items()]
    gen = torch.Generator().manual_seed(seed)
    chunk = 1 << 22
    with ShardedWriter(path, infos, max_shard_size="500MB") as writer:
        for info in infos:
            for start in range(0, info.numel, chunk):
                n = min(chunk, info.numel - start)
                writer.append(info.name, (torch.randn(n, generator=gen) * 0.02).to(dtype))
    return {"bytes": writer.total_bytes, "largest_tensor_bytes": max(i.nbytes for i in infos), "tensors": len(infos)}


def _status_bytes(key: str) -> int:
    """VmRSS / VmHWM of this process from /proc (kB -> bytes). VmHWM is per address space, so a
    fresh child does not inherit the parent's peak as ru_maxrss would."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak_rss() -> None:
    """Make VmHWM start from the current RSS, so the peak is the work's, not the imports'."""
    Path("/proc/self/clear_refs").write_text("5")


def child(method: str, a: str, b: str, out: str) -> None:
    """Runs in a fresh process: one method, then prints JSON {seconds, peak_rss, baseline_rss}."""
    import torch  # noqa: F401  (imports are the fixed overhead, measured before the work)

    if method in ("taxfree",):
        from taxfree.merging import PartwiseWeights, merge_checkpoints
    if method == "transformers":
        from transformers import AutoModelForCausalLM
    baseline = _status_bytes("VmRSS")
    _reset_peak_rss()
    start = time.perf_counter()
    if method == "taxfree":
        merge_checkpoints([a, b], out, partwise=PartwiseWeights(aligned_weight=0.5), max_shard_size="500MB")
    elif method == "transformers":
        import torch

        model_a = AutoModelForCausalLM.from_pretrained(a, dtype="auto")
        model_b = AutoModelForCausalLM.from_pretrained(b, dtype="auto")
        state_b = model_b.state_dict()
        merged = {k: (0.5 * v.float() + 0.5 * state_b[k].float()).to(v.dtype) for k, v in model_a.state_dict().items()}
        model_a.load_state_dict(merged)
        model_a.save_pretrained(out, max_shard_size="500MB")
    elif method == "copy":
        os.makedirs(out)
        buf = bytearray(64 << 20)
        view = memoryview(buf)
        shards_a = sorted(Path(a).glob("*.safetensors"))
        shards_b = sorted(Path(b).glob("*.safetensors"))
        for sa, sb in zip(shards_a, shards_b):
            with open(sa, "rb", buffering=0) as fa, open(sb, "rb", buffering=0) as fb, \
                    open(Path(out) / sa.name, "wb", buffering=0) as fo:
                while n := fa.readinto(view):
                    fb.readinto(view)  # same amount from the other input, discarded
                    fo.write(view[:n])
    elif method == "cp":
        shutil.copytree(a, out)
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    print(json.dumps({"seconds": seconds, "peak_rss": peak, "baseline_rss": baseline}))


def run_child(method: str, a: Path, b: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    os.sync()  # start every run with no dirty pages from the previous one pending writeback
    env = {**os.environ, "PYTHONPATH": str(HERE.parents[1]), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(HERE), "--child", method, str(a), str(b), str(out)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--methods", default="taxfree,transformers,copy,cp")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    parser.add_argument("--out-root", default=None,
                        help="write outputs under this directory instead (e.g. /dev/shm to take the disk out)")
    parser.add_argument("--child", nargs=4, metavar=("METHOD", "A", "B", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    root = Path(tempfile.mkdtemp(prefix="taxfree-bench-merge-", dir="/tmp"))
    try:
        t = time.perf_counter()
        info = make_checkpoint(root / "a", 0, args.dtype, args.layers)
        make_checkpoint(root / "b", 1, args.dtype, args.layers)
        print(f"inputs: 2 x {info['bytes'] / 1e9:.2f} GB ({args.dtype}, {info['tensors']} tensors, largest "
              f"{info['largest_tensor_bytes'] / 1e6:.0f} MB), made in {time.perf_counter() - t:.1f} s", flush=True)
        out_root = Path(tempfile.mkdtemp(prefix="taxfree-bench-out-", dir=args.out_root)) if args.out_root else root
        rows = {}
        methods = args.methods.split(",")
        for rep in range(args.repeat):
            for method in methods[rep % len(methods):] + methods[: rep % len(methods)]:  # rotate the order
                r = run_child(method, root / "a", root / "b", out_root / "out")
                best = rows.setdefault(method, {**r, "all": []})
                best["all"].append(r["seconds"])
                best["seconds"] = min(best["seconds"], r["seconds"])
                best["peak_rss"] = max(best["peak_rss"], r["peak_rss"])
                print(f"  rep {rep} {method}: {r['seconds']:.2f} s, peak RSS {r['peak_rss'] / 1e6:.0f} MB", flush=True)
        for r in rows.values():
            r["median"] = statistics.median(r["all"])
        copy = rows.get("copy")
        print("\n| method | best time (s) | vs copy | median time (s) | vs copy | peak RSS (MB) | RSS after imports (MB) "
              "| peak - imports (MB) |")
        print("|---|---|---|---|---|---|---|---|")
        for method, r in rows.items():
            best = f"{r['seconds'] / copy['seconds']:.2f}x" if copy else "-"
            median = f"{r['median'] / copy['median']:.2f}x" if copy else "-"
            print(f"| {method} | {r['seconds']:.2f} | {best} | {r['median']:.2f} | {median} | {r['peak_rss'] / 1e6:.0f} "
                  f"| {r['baseline_rss'] / 1e6:.0f} | {(r['peak_rss'] - r['baseline_rss']) / 1e6:.0f} |")
    finally:
        if args.out_root and "out_root" in locals():
            shutil.rmtree(out_root, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept {root}")


if __name__ == "__main__":
    main()
