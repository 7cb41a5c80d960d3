"""The online merging optimizers under FSDP2 (`fully_shard`, DTensor parameters).

FSDP2 shards each parameter on dim 0 over the ranks of its mesh (uneven shards as torch.chunk),
so this rank's local tensor is one contiguous range of the flattened tensor. `dtensor_layout`
describes a param group of such DTensors as the same `FlatLayout` the FSDP1 and ZeRO support use
(one piece per parameter, its offset in the whole tensor), so OnTIES's top-k and both
optimizers' L1 rescales are combined across the ranks exactly (taxfree.optim.sharded) and an
FSDP2 run keeps the entries an unsharded run keeps. HSDP meshes (replicate x shard) reduce over
the shard dimension only. Other placements (tensor parallelism: Shard(1), two Shard dims) have
no such layout: their merge works within each local shard.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from taxfree.optim.sharded import FlatLayout, Segment


def _shard_dim(placements) -> int | None:
    """The mesh dim the tensor is split on (dim 0), -1 when fully replicated, None when the
    placement is anything else."""
    from torch.distributed.tensor import Replicate, Shard

    dims = []
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Shard):
            if placement.dim != 0:
                return None
            dims.append(mesh_dim)
        elif not isinstance(placement, Replicate):
            return None
    if len(dims) > 1:
        return None
    return dims[0] if dims else -1


def dtensor_layout(optimizer: Any, group: dict, group_index: int) -> FlatLayout | None:
    """The layout of `group` when every parameter is a DTensor sharded on dim 0 over one mesh
    dimension (FSDP2, HSDP) or replicated over the mesh; None otherwise."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    params = list(group["params"])
    if not params or not all(isinstance(p, DTensor) for p in params):
        return None
    mesh = params[0].device_mesh
    dims = {_shard_dim(p.placements) for p in params}
    if None in dims or any(p.device_mesh != mesh for p in params):
        return None
    sharded = dims - {-1}
    if len(sharded) != 1:
        return None
    (mesh_dim,) = sharded
    process_group = mesh.get_group(mesh_dim)
    rank = dist.get_rank(group=process_group)
    world = dist.get_world_size(group=process_group)
    segments, shared = [], []
    for t, p in enumerate(params):
        local_shape, offset = compute_local_shape_and_global_offset(p.shape, mesh, p.placements)
        held = math.prod(local_shape)
        if held != p.to_local().numel() or not p.to_local().is_contiguous():
            return None
        row = math.prod(p.shape[1:]) if p.dim() else 1
        if held:
            segments.append(Segment(tensor=t, start=0, numel=held, offset=offset[0] * row if p.dim() else 0))
        split = _shard_dim(p.placements) == mesh_dim and p.dim() and p.shape[0] > math.ceil(p.shape[0] / world)
        shared.append(bool(split))
    local = params[0].to_local()
    return FlatLayout(
        names=[optimizer.parameter_name(group_index, i) for i in range(len(params))],
        numels=[p.numel() for p in params],
        shapes=[tuple(p.shape) for p in params],
        shared=shared,
        segments=segments,
        process_group=process_group,
        rank=rank,
        world=world,
        dtype=params[0].dtype,
        device=local.device if local.device.type != "meta" else torch.device("cpu"),
        seed_key=(2, group_index, rank),
        originals=params,
        per_param=True,
    )
