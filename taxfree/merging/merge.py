"""Streaming weighted averaging of checkpoints: `sum_i w_i * theta_i`, one chunk at a time.

Every input is read in fixed-size chunks (same element range of the same tensor from each
model), combined with float32 arithmetic, rounded once to the output dtype (the first model's
dtype for that tensor) and appended to the output shard. Peak memory is a few chunk buffers,
whatever the model or tensor size. Integer/bool tensors are not averaged: they must be equal in
every model and are copied.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Mapping, Sequence

import torch

from taxfree.atomic import atomic_dir
from taxfree.errors import TaxfreeError
from taxfree.merging.checkpoint import Checkpoint, InMemoryCheckpoint, ShardedWriter, TensorInfo
from taxfree.merging.plan import PartwiseWeights, is_tied, linear_weights, plan_partwise

Source = Checkpoint | InMemoryCheckpoint
DEFAULT_CHUNK_BYTES = 32 * 1024 * 1024  # float32 working buffer per chunk; a few of these is the peak
DEFAULT_MAX_SHARD_SIZE = "5GB"
RECIPE_NAME = "merge.json"


def check_compatible(sources: Sequence[Source], labels: Sequence[str]) -> None:
    """Same architecture, same tensor names, same shapes; the first difference is the error."""
    first, first_label = sources[0], labels[0]
    for source, label in zip(sources[1:], labels[1:]):
        for key in ("model_type", "architectures"):
            a, b = first.config.get(key), source.config.get(key)
            if a is not None and b is not None and a != b:
                raise TaxfreeError(f"different architectures: {first_label} is {a}, {label} is {b}")
        only_first = [n for n in first.names if n not in source.tensors]
        only_other = [n for n in source.names if n not in first.tensors]
        if only_first:
            raise TaxfreeError(f"tensor {only_first[0]!r} is in {first_label} but not in {label}")
        if only_other:
            raise TaxfreeError(f"tensor {only_other[0]!r} is in {label} but not in {first_label}")
        for name in first.names:
            a, b = first.tensors[name].shape, source.tensors[name].shape
            if a != b:
                raise TaxfreeError(f"tensor {name!r} has shape {list(a)} in {first_label} but {list(b)} in {label}")
            fa, fb = first.tensors[name].dtype.is_floating_point, source.tensors[name].dtype.is_floating_point
            if fa != fb:
                raise TaxfreeError(f"tensor {name!r} is {first.tensors[name].dtype} in {first_label} but "
                                   f"{source.tensors[name].dtype} in {label}")


def write_merged(
    sources: Sequence[Source],
    weights: Mapping[str, Sequence[float]],
    out_dir: str | os.PathLike,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    labels: Sequence[str] | None = None,
) -> dict:
    """Write `sum_i weights[name][i] * sources[i][name]` for every tensor of sources[0] into out_dir.

    Sources must be compatible (see check_compatible). Two models whose weights are (1 - w, w)
    in the same dtype: `torch.lerp(x_0, x_1, w)`, which computes in float32 for bf16/fp16 and
    rounds once (one memory pass, as fast as a copy). Otherwise float32 (float64 for float64
    tensors): `acc = w_0 * x_0; acc += w_i * x_i`, then cast to the output dtype (sources[0]'s).
    Returns {"tensors", "shards", "bytes"}.
    """
    labels = list(labels or [f"model {i + 1}" for i in range(len(sources))])
    infos = [sources[0].tensors[n] for n in sources[0].names]
    chunk = max(1, chunk_bytes // 4)  # elements per slice
    widest = max((i.dtype.itemsize for s in sources for i in s.tensors.values()), default=4)
    slices = [(info, start, min(start + chunk, info.numel)) for info in infos for start in range(0, info.numel, chunk)]
    # A three-stage pipeline over slices: a reader thread fetches slice k+1 and a writer thread
    # writes slice k-1 while slice k is combined here. Every buffer comes in two sets (slice
    # parity); a set is reused only after the write of the slice that last held it has finished.
    in_bufs = [[torch.empty(chunk * widest, dtype=torch.uint8) for _ in sources] for _ in range(2)]
    acc_bufs = [torch.empty(chunk * 8, dtype=torch.uint8) for _ in range(2)]
    out_bufs = [torch.empty(chunk * widest, dtype=torch.uint8) for _ in range(2)]
    per_tensor = {}
    for info in infos:
        w = [float(x) for x in weights[info.name]]
        if len(w) != len(sources):
            raise ValueError(f"{info.name}: {len(w)} weights for {len(sources)} models")
        # (1 - w) x0 + w x1 == lerp(x0, x1, w): one pass, float32 internally for half types
        per_tensor[info.name] = (w, w[1] if len(w) == 2 and abs(w[0] + w[1] - 1.0) < 1e-12 else None)

    def read(k: int) -> list[torch.Tensor]:
        info, start, stop = slices[k]
        return [s.read_flat(info.name, start, stop, out=b) for s, b in zip(sources, in_bufs[k % 2])]

    # One intra-op thread: the arithmetic is memory-bound, and a spinning OpenMP pool starves the
    # reader thread and the writes (measured 2-3x slower with 2 threads on 2 busy cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    writes: list = [None, None]  # the pending write of the last slice of each parity
    try:
        with ThreadPoolExecutor(max_workers=1) as reader, ThreadPoolExecutor(max_workers=1) as write_pool, \
                ShardedWriter(out_dir, infos, max_shard_size) as writer:
            try:
                pending = reader.submit(read, 0) if slices else None
                for k, (info, _, _) in enumerate(slices):
                    xs = pending.result()
                    if writes[(k + 1) % 2] is not None:  # slice k-1 may still be writing from those buffers
                        writes[(k + 1) % 2].result()
                    if k + 1 < len(slices):
                        pending = reader.submit(read, k + 1)
                    if info.dtype.is_floating_point:
                        merged = _combine(xs, info.dtype, *per_tensor[info.name], acc_bufs[k % 2], out_bufs[k % 2])
                    else:
                        _check_equal(info, xs, labels)
                        merged = xs[0]
                    writes[k % 2] = write_pool.submit(writer.append, info.name, merged)
                for w in writes:  # a failed write is this merge's error
                    if w is not None:
                        w.result()
            finally:  # the writer closes only after every submitted write has ended
                for w in writes:
                    if w is not None:
                        w.exception()
    finally:
        torch.set_num_threads(threads)
    return {"tensors": len(infos), "shards": len(writer.files), "bytes": writer.total_bytes}


def _combine(xs: Sequence[torch.Tensor], dtype: torch.dtype, w: Sequence[float], lerp_weight: float | None,
             acc_buf: torch.Tensor, out_buf: torch.Tensor) -> torch.Tensor:
    """sum_i w_i xs_i for one slice, in `dtype`, using the preallocated byte buffers."""
    n = xs[0].numel()
    out = out_buf[: n * dtype.itemsize].view(dtype)
    if lerp_weight is not None and xs[0].dtype == xs[1].dtype == dtype:
        return torch.lerp(xs[0], xs[1], lerp_weight, out=out)
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    acc = acc_buf[: n * acc_dtype.itemsize].view(acc_dtype)
    if xs[0].dtype == acc_dtype:
        torch.mul(xs[0], w[0], out=acc)
    else:  # upcast first: mul(bf16, w, out=fp32) would round the product to bf16
        acc.copy_(xs[0]).mul_(w[0])
    for x, wi in zip(xs[1:], w[1:]):
        acc.add_(x, alpha=wi)  # mixed-dtype in-place add computes in acc's dtype
    return acc if dtype == acc_dtype else out.copy_(acc)


def _check_equal(info: TensorInfo, xs: Sequence[torch.Tensor], labels: Sequence[str]) -> None:
    for x, label in zip(xs[1:], labels[1:]):
        if not torch.equal(xs[0], x):
            raise TaxfreeError(f"non-float tensor {info.name!r} differs between {labels[0]} and {label}; "
                               "it cannot be averaged")


def copy_auxiliary_files(source: Checkpoint, out_dir: Path) -> list[str]:
    """Config, tokenizer, generation config, chat template...: everything but weights, from one input."""
    copied = []
    for path in source.auxiliary_files():
        if path.name == RECIPE_NAME:
            continue
        shutil.copy2(path, out_dir / path.name)
        copied.append(path.name)
    return copied


def merge_checkpoints(
    model_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    weights: Sequence[float] | None = None,
    partwise: PartwiseWeights | None = None,
    normalize: bool = False,
    allow_extrapolation: bool = False,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> dict:
    """Average checkpoint directories into `out_dir`, streaming; nothing is written on error.

    Either `weights` (one per model, linear) or `partwise` (two models: [sft, aligned]).
    Config, tokenizer and generation files are copied from the first model. The output is
    written to a temporary sibling and renamed into place when complete. Returns a summary,
    also written to `out_dir/merge.json`.
    """
    if (weights is None) == (partwise is None):
        raise TaxfreeError("give either per-model weights or partwise weights")
    dirs = [Path(d) for d in model_dirs]
    out = Path(out_dir)
    for d in dirs:
        if out.resolve() == d.resolve():
            raise TaxfreeError(f"output directory {out} is one of the inputs")
    if partwise is not None:
        if len(dirs) != 2:
            raise TaxfreeError(f"partwise weights need exactly 2 models (sft, aligned), got {len(dirs)}")
        partwise.validate(allow_extrapolation)
        labels = [f"sft ({dirs[0]})", f"aligned ({dirs[1]})"]
    else:
        model_weights = linear_weights(weights, normalize, allow_extrapolation)
        labels = [str(d) for d in dirs]
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise TaxfreeError(f"{out}: output directory exists and is not empty (use --force to replace it)")

    started = time.perf_counter()
    sources = [Checkpoint(d) for d in dirs]
    try:
        check_compatible(sources, labels)
        names = sources[0].names
        summary: dict = {"models": [str(d) for d in dirs]}
        if partwise is not None:
            tied = is_tied(sources[0].config)
            aligned, layers = plan_partwise(names, partwise, tied)
            per_tensor = {n: (1.0 - a, a) for n, a in aligned.items()}
            embed, head = partwise.part_weights()
            summary.update({"mode": "partwise", "aligned_weight_by_layer": layers,
                            "embed_aligned_weight": embed, "head_aligned_weight": head, "tied_embeddings": tied})
        else:
            per_tensor = {n: model_weights for n in names}
            summary.update({"mode": "linear", "weights": model_weights})
        with atomic_dir(out, overwrite=overwrite) as tmp:
            written = write_merged(sources, per_tensor, tmp, max_shard_size, chunk_bytes, labels)
            summary["copied_files"] = copy_auxiliary_files(sources[0], tmp)
            summary.update(written)
            (tmp / RECIPE_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    finally:
        for s in sources:
            s.close()
    summary["out_dir"] = str(out)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary
