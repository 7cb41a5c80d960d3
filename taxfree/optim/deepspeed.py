"""The online merging optimizers as DeepSpeed ZeRO's "basic optimizer" (stages 1, 2 and 3).

DeepSpeed flattens the model's tensors per param group, partitions the flat fp32 master weights
over the data-parallel ranks and puts each rank's partition into the optimizer's param group in
place of the tensors. The optimizer keeps a record of the tensors it was built with (see
`OnlineMergingAdamW.add_param_group`); at the first step on a partition, `zero_flat_layout` reads
from DeepSpeed which piece of which tensor lies where in it:

- ZeRO-1/2 (`DeepSpeedZeroOptimizer`, and `BF16_Optimizer`): every linked model tensor carries
  `_hp_mapping` (offset of its piece in the rank's fp32 partition and in the tensor) and
  `_dp_group`. Which tensors straddle a partition boundary is found with one all-reduce.
- ZeRO-3 (`DeepSpeedZeroOptimizer_Stage3`): every model tensor carries `_z3_optimizer`; sub-group
  s's partition is the concatenation of its tensors' `ds_tensor`s, each `partition_numel()`
  long, rank r holding entries [r*n, (r+1)*n) of the tensor (the tail is padding).

Nothing here imports deepspeed: it reads the attributes DeepSpeed 0.19 puts on tensors. The
Trainer glue (for DeepSpeed and FSDP2 alike) is `taxfree.optim.trainer.hand_optimizer_to_trainer`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from taxfree.errors import TaxfreeError
from taxfree.optim.sharded import FlatLayout, Segment


def zero_flat_layout(optimizer: Any, group: dict, flat: Tensor) -> FlatLayout | None:
    """The layout of `flat` if it is a ZeRO partition of `group`'s tensors, else None."""
    record = getattr(optimizer, "_originals", {}).get(id(group))
    if record is None:
        return None
    group_index, params = record
    stage3 = next((getattr(p, "_z3_optimizer") for p in params if hasattr(p, "_z3_optimizer")), None)
    if stage3 is not None:
        return _stage3_layout(optimizer, group, group_index, params, flat, stage3)
    if any(hasattr(p, "_hp_mapping") for p in params):
        return _stage12_layout(optimizer, group, group_index, params, flat)
    return None


def _names(optimizer: Any, group: dict) -> dict[int, str]:
    return {id(p): name for name, p in optimizer.original_parameters(group)}


def _common_dtype(tensors: list[Tensor], fallback: torch.dtype) -> torch.dtype:
    dtypes = {t.dtype for t in tensors}
    return dtypes.pop() if len(dtypes) == 1 else fallback


def _stage12_layout(optimizer, group, group_index, params, flat) -> FlatLayout:
    import torch.distributed as dist

    tensors = [p for p in params if hasattr(p, "_hp_mapping")]  # DeepSpeed links trainable ones
    names = _names(optimizer, group)
    process_group = tensors[0]._dp_group
    storage = flat.untyped_storage().data_ptr()
    segments = []
    held = torch.zeros(len(tensors), dtype=torch.int64)
    for t, p in enumerate(tensors):
        mapping = p._hp_mapping
        if mapping is None:
            continue
        if mapping.hp_fragment.untyped_storage().data_ptr() != storage:
            raise TaxfreeError(
                f"DeepSpeed maps {names[id(p)]!r} into another partition than the one stepped"
            )
        hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
        segments.append(Segment(tensor=t, start=hp.start, numel=hp.numel, offset=lp.start))
        held[t] = hp.numel
    dist.all_reduce(held, op=dist.ReduceOp.MAX, group=process_group)
    numels = [p.numel() for p in tensors]
    rank = dist.get_rank(group=process_group)
    return FlatLayout(
        names=[names[id(p)] for p in tensors],
        numels=numels,
        shapes=[tuple(p.shape) for p in tensors],
        shared=[int(h) < n for h, n in zip(held.tolist(), numels)],
        segments=segments,
        process_group=process_group,
        rank=rank,
        world=dist.get_world_size(group=process_group),
        dtype=_common_dtype(tensors, flat.dtype),
        device=flat.device,
        seed_key=(2, group_index, rank),
        originals=tensors,
    )


def _stage3_layout(optimizer, group, group_index, params, flat, stage3) -> FlatLayout | None:
    import torch.distributed as dist

    sub = next((i for i, f in enumerate(stage3.fp32_partitioned_groups_flat) if f is flat), None)
    if sub is None:
        return None
    members = list(stage3.fp16_groups[sub])
    names = _names(optimizer, group)
    missing = [i for i, p in enumerate(members) if id(p) not in names]
    if missing:
        raise TaxfreeError(
            f"DeepSpeed ZeRO-3 partition holds {len(missing)} tensors the optimizer was not built with"
        )
    process_group = stage3._get_sub_group_process_group(sub)
    rank = dist.get_rank(group=process_group)
    segments, start = [], 0
    for t, p in enumerate(members):
        n = p.partition_numel()
        offset = rank * n
        held = max(0, min(p.ds_numel - offset, n))
        if held:
            segments.append(Segment(tensor=t, start=start, numel=held, offset=offset))
        start += n
    if start != flat.numel():
        raise TaxfreeError(
            f"DeepSpeed ZeRO-3 partition has {flat.numel()} entries, its tensors' pieces {start}"
        )
    return FlatLayout(
        names=[names[id(p)] for p in members],
        numels=[p.ds_numel for p in members],
        shapes=[tuple(p.ds_shape) for p in members],
        shared=[p.ds_numel > p.partition_numel() for p in members],
        segments=segments,
        process_group=process_group,
        rank=rank,
        world=dist.get_world_size(group=process_group),
        dtype=_common_dtype(members, flat.dtype),
        device=flat.device,
        seed_key=(3, group_index, sub, rank),
        originals=members,
    )
