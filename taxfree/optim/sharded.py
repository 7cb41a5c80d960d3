"""Flat partitions that hold pieces of many tensors, and exact per-tensor reductions across ranks.

DeepSpeed ZeRO hands the optimizer one flat fp32 tensor per group (or sub-group) and rank: the
concatenation of this rank's pieces of the model's tensors. The online merging rules work per
original tensor (OnDARE's L1 rescale, OnTIES's top-k and its rescale), so a `FlatLayout` says which
entries of the flat tensor belong to which tensor, and where a tensor's entries are spread over
ranks the per-tensor quantities are combined across them: L1 sums by an all-reduce, the top-k
threshold by an exact radix select whose histograms are all-reduced (four rounds of 256 counts),
and the entries tied with it by one more all-reduce of per-rank tie counts (ties go by lowest
flat position in the whole tensor). Both give what an unsharded run computes (sums up to fp64
summation order; the kept entries exactly), so the kept entries are the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from taxfree.optim.sparsify import keep_above_and_ties


@dataclass(frozen=True)
class Segment:
    """This rank's piece of one tensor:
    flat[start : start + numel] == tensor.flatten()[offset : offset + numel]."""

    tensor: int  # index into FlatLayout.names
    start: int
    numel: int
    offset: int


@dataclass
class FlatLayout:
    """What one flat partition holds. `names`, `numels`, `shapes` and `shared` list every tensor of
    the partition's group in the same order on every rank (the collectives rely on it); `segments`
    are the pieces on this rank (at most one per tensor)."""

    names: list[str]
    numels: list[int]
    shapes: list[tuple[int, ...]]
    shared: list[bool]  # the tensor's entries lie on more than one rank
    segments: list[Segment]
    process_group: Any  # torch.distributed group of the ranks that share the tensors (None: world)
    rank: int
    world: int
    dtype: torch.dtype  # the model's dtype of these tensors (tau is kept in it by default)
    device: torch.device  # of the partition: where the collectives' buffers live
    seed_key: tuple[int, ...]  # distinguishes the masks of different partitions and ranks
    originals: list[Any] = field(default_factory=list, repr=False)  # the model's tensors, by index
    # FSDP1: the optimizer's parameters are the pieces themselves (tensor t is originals[t], one
    # parameter each), not segments of one flat partition
    per_param: bool = False
    _index: dict[int, int] | None = field(default=None, init=False, repr=False, compare=False)

    def tensor_of(self, param: Any) -> int:
        """Index of the tensor whose piece `param` is (per_param layouts)."""
        if self._index is None:
            self._index = {id(p): t for t, p in enumerate(self.originals)}
        return self._index[id(param)]

    @property
    def any_shared(self) -> bool:
        return any(self.shared)


def _all_reduce(tensor: Tensor, group: Any) -> None:
    import torch.distributed as dist

    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)


def tensor_sums(layout: FlatLayout, tensors: list[int], local: Tensor) -> Tensor:
    """Per-tensor sums over all ranks. local[i] holds this rank's partial sums (one row of fp64
    values) for tensor `tensors[i]`; every rank calls this together, with its own rows."""
    columns = local.shape[1] if local.dim() == 2 else 1
    device = layout.device
    full = torch.zeros(len(layout.names), columns, dtype=torch.float64, device=device)
    index = torch.tensor(tensors, dtype=torch.long, device=device)
    if tensors:
        full[index] = local.reshape(len(tensors), columns).to(device=device, dtype=torch.float64)
    _all_reduce(full, layout.process_group)
    return full[index]


def tensor_min(layout: FlatLayout, local: dict[int, float], tensors: list[int]) -> dict[int, float]:
    """The smallest over all ranks of a per-tensor value, for `tensors` (the same list on every
    rank; a rank without a value for a tensor contributes +inf)."""
    import torch.distributed as dist

    values = torch.tensor([local.get(t, float("inf")) for t in tensors], dtype=torch.float64,
                          device=layout.device)
    if values.numel():
        dist.all_reduce(values, op=dist.ReduceOp.MIN, group=layout.process_group)
    return dict(zip(tensors, values.tolist()))


def tensor_counts(layout: FlatLayout, local: dict[int, int], tensors: list[int]) -> dict[int, int]:
    """Per-tensor counts summed over all ranks, for `tensors` (the same list on every rank)."""
    counts = torch.tensor([local.get(t, 0) for t in tensors], dtype=torch.int64, device=layout.device)
    if counts.numel():
        _all_reduce(counts, layout.process_group)
    return dict(zip(tensors, counts.tolist()))


def kth_largest(
    layout: FlatLayout, ks: dict[int, int], values: dict[int, Tensor]
) -> dict[int, Tensor]:
    """The k-th largest entry of each tensor over all ranks, exactly (ties included as kthvalue).

    ks: {tensor index: k}, the same on every rank (k <= the tensor's numel). values: this rank's
    entries of those tensors (flat, non-negative; absent or empty where it holds none; bf16 and
    fp16 are widened to fp32 exactly).
    Non-negative floats order like their bit patterns read as int32, so the threshold is found a
    byte at a time from the top: each round every rank counts its candidates per byte value, the
    counts are all-reduced, and the byte where the running count reaches k is fixed. Four rounds
    fix all 32 bits; after the first, only entries whose high bytes match remain candidates.
    """
    order = sorted(ks)
    if not order:
        return {}
    device = layout.device
    need = torch.tensor([ks[t] for t in order], dtype=torch.int64, device=device)
    prefix = torch.zeros(len(order), dtype=torch.int64, device=device)
    empty = torch.zeros(0, dtype=torch.int32, device=device)
    candidates = []
    for t in order:
        v = values.get(t)
        if v is None or v.numel() == 0:
            candidates.append(empty)
        else:
            if v.dtype in (torch.bfloat16, torch.float16):
                v = v.float()
            if v.dtype != torch.float32:
                raise TypeError(f"kth_largest needs float32 magnitudes, got {v.dtype}")
            candidates.append(v.contiguous().view(torch.int32))
    for shift in (24, 16, 8, 0):
        digits = [(c >> shift) & 255 for c in candidates]
        counts = torch.zeros(len(order), 256, dtype=torch.int64, device=device)
        for i, d in enumerate(digits):
            if d.numel():
                counts[i] = torch.bincount(d, minlength=256)
        _all_reduce(counts, layout.process_group)
        at_least = counts.flip(1).cumsum(1)  # [:, j]: entries whose byte is >= 255 - j
        j = torch.argmax((at_least >= need.unsqueeze(1)).to(torch.int8), dim=1)
        byte = 255 - j
        reached = at_least.gather(1, j.unsqueeze(1)).squeeze(1)
        need -= reached - counts.gather(1, byte.unsqueeze(1)).squeeze(1)  # minus those above
        prefix |= byte << shift
        chosen = byte.tolist()
        candidates = [c[d == b] for c, d, b in zip(candidates, digits, chosen)]
    thresholds = prefix.to(torch.int32).view(torch.float32)
    return {t: thresholds[i] for i, t in enumerate(order)}


def take_top_k_across_ranks(
    layout: FlatLayout, ks: dict[int, int], values: dict[int, Tensor], offsets: dict[int, int]
) -> dict[int, Tensor]:
    """Exactly k entries of each tensor over all ranks, as `sparsify.take_top_k` picks them in
    the unsharded tensor: every entry above the k-th largest, then the entries equal to it by
    lowest flat position in the whole tensor.

    ks, values: as `kth_largest`; offsets: {tensor: flat position in the whole tensor of this
    rank's first entry in `values[tensor]`} (pieces are contiguous ranges). Returns this rank's
    kept positions within values[tensor] (ascending) for every tensor it holds entries of. After
    the radix select, one all-reduce shares per tensor the count above the threshold and each
    rank's count of ties and offset, so each rank knows how many ties lie before its piece.
    """
    thresholds = kth_largest(layout, ks, values)
    order = sorted(ks)
    if not order:
        return {}
    world, rank = layout.world, layout.rank
    counts = torch.zeros(len(order), 1 + 2 * world, dtype=torch.int64, device=layout.device)
    for i, t in enumerate(order):
        v = values.get(t)
        if v is None or v.numel() == 0:
            continue
        threshold = thresholds[t].to(v.dtype)
        counts[i, 0] = torch.count_nonzero(v > threshold)
        counts[i, 1 + rank] = torch.count_nonzero(v == threshold)
        counts[i, 1 + world + rank] = offsets[t]
    _all_reduce(counts, layout.process_group)
    counts = counts.cpu()
    out = {}
    for i, t in enumerate(order):
        v = values.get(t)
        if v is None or v.numel() == 0:
            continue
        row = counts[i].tolist()
        ties, starts = row[1 : 1 + world], row[1 + world :]
        before = sum(n for r, n in enumerate(ties) if r != rank and n and starts[r] < offsets[t])
        quota = max(0, min(ties[rank], ks[t] - row[0] - before))
        out[t] = keep_above_and_ties(v, thresholds[t].to(v.dtype), quota)
    return out
