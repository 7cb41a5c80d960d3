"""The online merging optimizers under FSDP1 (`FullyShardedDataParallel`, `use_orig_params=True`).

FSDP1 flattens the tensors of each wrapped module into one FlatParameter, shards it over the
ranks, and (with `use_orig_params=True`) points each original parameter at its piece of this
rank's shard: a 1-D view, possibly empty, covering entries [start, start + numel) of the
flattened tensor. The optimizer is handed those pieces. `fsdp1_layout` reads from FSDP which
piece of which tensor each parameter is, so that tau is cut from the full tensor's tau (the mask
and top-k of an unsharded run) and per-tensor quantities (OnTIES's top-k threshold and rescale,
OnDARE's L1 rescale) are combined across the ranks by the same exact reductions as under
DeepSpeed ZeRO (taxfree.optim.sharded). Call `optimizer.bind_fsdp1(fsdp_model)` after wrapping.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from taxfree.errors import TaxfreeError
from taxfree.optim.sharded import FlatLayout, Segment


def fsdp1_pieces(model: Any) -> dict[int, tuple[tuple[int, ...], int, int, int, Any]]:
    """id(parameter) -> (full shape, full numel, start in the flattened tensor, numel held here,
    process group) for every parameter FSDP1 manages in `model`."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    out = {}
    for module in FSDP.fsdp_modules(model):
        handle = getattr(module, "_handle", None)
        if handle is None:
            continue
        if not handle._use_orig_params:
            raise TaxfreeError("FSDP1 without use_orig_params hands the optimizer one flat tensor per module: "
                               "wrap with use_orig_params=True (fsdp_use_orig_params: true in accelerate)")
        flat = handle.flat_param
        for param, shape, numel, info in zip(flat._params, flat._shapes, flat._numels, flat._shard_param_infos):
            start, held = (info.intra_param_start_idx, info.numel_in_shard) if info.in_shard else (0, 0)
            out[id(param)] = (tuple(shape), int(numel), int(start), int(held), module.process_group)
    return out


def fsdp1_layout(optimizer: Any, group: dict, pieces: dict) -> FlatLayout | None:
    """The layout of `group` when its parameters are FSDP1 pieces (None when none is): one
    tensor per parameter, in the group's order, which every rank shares."""
    import torch.distributed as dist

    params = list(group["params"])
    mine = [pieces.get(id(p)) for p in params]
    if not any(m is not None for m in mine):
        return None
    if any(m is None for m in mine):
        raise TaxfreeError("a param group mixes FSDP1-managed parameters with others: give them separate groups")
    groups = {id(m[4]) for m in mine}
    if len(groups) != 1:
        raise TaxfreeError("a param group holds parameters of FSDP1 units with different process groups")
    process_group = mine[0][4]
    rank = dist.get_rank(group=process_group)
    held = torch.tensor([m[3] for m in mine], dtype=torch.int64)
    most = held.clone()
    dist.all_reduce(most, op=dist.ReduceOp.MAX, group=process_group)
    group_index = optimizer.param_groups.index(group)
    names = [optimizer.parameter_name(group_index, i) for i in range(len(params))]
    device = params[0].device
    return FlatLayout(
        names=names,
        numels=[m[1] for m in mine],
        shapes=[m[0] for m in mine],
        shared=[int(h) < m[1] for h, m in zip(most.tolist(), mine)],
        segments=[Segment(tensor=t, start=0, numel=m[3], offset=m[2]) for t, m in enumerate(mine) if m[3]],
        process_group=process_group,
        rank=rank,
        world=dist.get_world_size(group=process_group),
        dtype=params[0].dtype,
        device=device,
        seed_key=(1, group_index, rank),
        originals=params,
        per_param=True,
    )


def piece_of(full: Tensor, layout: FlatLayout, index: int) -> Tensor:
    """This rank's piece of tensor `index` of the layout, cut from the whole (flattened) tensor."""
    seg = next((s for s in layout.segments if s.tensor == index), None)
    flat = full.reshape(-1)
    if seg is None:
        return flat[:0].clone()
    return flat[seg.offset : seg.offset + seg.numel].clone()
