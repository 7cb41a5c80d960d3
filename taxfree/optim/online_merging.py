"""The part OnDARE-AdamW and OnTIES-AdamW share: AdamW moments, tau, online_step, state.

Each step runs torch.optim.AdamW's maths over all parameters of a group with foreach ops, then
hands the update D of every parameter to the subclass's merge rule (docs/algorithms.md 1.3, 1.4).
The task vector tau lives in the optimizer state (dense, or as flat indices + values when that
is much smaller), so `state_dict()`/`load_state_dict()` carry it and a resumed run continues
exactly. Masks are drawn from a generator re-seeded from (seed, group, step): no RNG state to
save, and every DDP rank draws the same mask.

Under DeepSpeed ZeRO the param groups end up holding flat fp32 partitions instead of the model's
tensors. The optimizer remembers the tensors (and names) it was built with, recognises a flat
partition at its first step (taxfree.optim.deepspeed), lays tau out like it, and hands the merge
rules one slot per original tensor piece plus the `FlatLayout` that combines per-tensor
quantities across ranks (taxfree.optim.sharded).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from taxfree.errors import TaxfreeError
from taxfree.params import Param
from taxfree.optim import cpu_kernel
from taxfree.optim.adamw_math import AdamCoefficients, adam_updates, advance_moments_, count_steps_
from taxfree.optim.named_tensors import NamedTensors, canonical_name
from taxfree.optim.sharded import FlatLayout, Segment
from taxfree.optim.sparsify import mix_seed

_TAU_KEYS = ("tau", "tau_index", "tau_value")


@dataclass
class MergeSlot:
    """One parameter at a merge step, as local (per-shard) tensors."""

    param: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    coefficients: AdamCoefficients
    tau: Tensor | None  # dense tau, or None when sparse
    tau_index: Tensor | None  # flat positions of the sparse tau
    tau_value: Tensor | None
    numel: int = 0  # entries of the whole tensor (0: the slot is the whole tensor)
    tensor: int | None = None  # index into the FlatLayout when the slot is a piece of a partition
    # Set (the flat gradient) when the moment update is left to the merge rule: it must run the
    # fused CPU pass (OnlineMergingAdamW.moments_ or cpu_kernel directly) before using m and v.
    grad: Tensor | None = None

    @property
    def full_numel(self) -> int:
        """What per-tensor sizes (OnTIES's k) are computed from: the original tensor's size."""
        return self.numel or self.param.numel()


def local(tensor: Tensor) -> Tensor:
    """The rank-local tensor of a DTensor (FSDP2 parameter or state); others unchanged."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def flat(tensor: Tensor) -> Tensor:
    """A 1-D view sharing storage (in-place updates through it must reach the parameter)."""
    if not tensor.is_contiguous():
        raise TaxfreeError("online merging optimizers need contiguous parameters")
    return tensor.view(-1)


def add_tau_(slots: list[MergeSlot], weight: float) -> None:
    """p += weight * tau for every slot; a sparse tau touches only its stored entries."""
    dense = [(s.param, s.tau) for s in slots if s.tau is not None]
    if dense:
        torch._foreach_add_([p for p, _ in dense], [t for _, t in dense], alpha=weight)
    for s in slots:
        if s.tau_index is not None and s.tau_index.numel():
            flat(s.param).index_add_(
                0, s.tau_index, s.tau_value.to(s.param.dtype), alpha=weight
            )


def segment_slot(
    flat_param: Tensor, state: dict, coefficients: AdamCoefficients, seg: Segment, layout: FlatLayout
) -> MergeSlot:
    """The slot of one tensor piece of a flat partition: views into the partition and its state
    (in-place updates land in the partition); a sparse tau is cut to the piece's positions."""
    a, n = seg.start, seg.numel
    tau = tau_index = tau_value = None
    if "tau" in state:
        tau = state["tau"].narrow(0, a, n)
    else:
        index = state["tau_index"]
        bounds = torch.tensor([a, a + n], dtype=index.dtype, device=index.device)
        lo, hi = torch.searchsorted(index, bounds).tolist()
        tau_index = index[lo:hi] - a
        tau_value = state["tau_value"][lo:hi]
    return MergeSlot(
        param=flat_param.narrow(0, a, n),
        exp_avg=state["exp_avg"].narrow(0, a, n),
        exp_avg_sq=state["exp_avg_sq"].narrow(0, a, n),
        coefficients=coefficients,
        tau=tau,
        tau_index=tau_index,
        tau_value=tau_value,
        numel=layout.numels[seg.tensor],
        tensor=seg.tensor,
    )


class OnlineMergingAdamW(Optimizer):
    """Base class; subclasses define `build_task_vector` and `apply_merged_update_`."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        reserve_p: float = 1.0,
        alpha: float = 0.0,
        use_merge: bool = False,
        rescale: bool = False,
        online_step: int = 1,
        clip_tau: float = 1.0,
        param_name_map: dict[tuple[int, int], str] | None = None,
        seed: int = 0,
        tau_dtype: torch.dtype | None = None,
        sparse_tau: bool | None = None,
    ):
        kind = type(self).__name__
        if not (isinstance(lr, Tensor) or lr >= 0.0):
            raise TaxfreeError(f"{kind}: lr must be >= 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise TaxfreeError(f"{kind}: betas must be two numbers in [0, 1), got {betas}")
        if eps < 0.0:
            raise TaxfreeError(f"{kind}: eps must be >= 0, got {eps}")
        if weight_decay < 0.0:
            raise TaxfreeError(f"{kind}: weight_decay must be >= 0, got {weight_decay}")
        if not 0.0 < reserve_p <= 1.0:
            raise TaxfreeError(f"{kind}: reserve_p must be in (0, 1], got {reserve_p}")
        if not 0.0 <= alpha <= 1.0:
            raise TaxfreeError(f"{kind}: alpha must be in [0, 1], got {alpha}")
        if isinstance(online_step, bool) or int(online_step) != online_step or online_step < 1:
            raise TaxfreeError(f"{kind}: online_step must be an integer >= 1, got {online_step}")
        if clip_tau <= 0.0:
            raise TaxfreeError(f"{kind}: clip_tau must be > 0, got {clip_tau}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            reserve_p=float(reserve_p),
            alpha=float(alpha),
            use_merge=bool(use_merge),
            rescale=bool(rescale),
            online_step=int(online_step),
            clip_tau=float(clip_tau),
            seed=int(seed),
            group_step=0,
        )
        super().__init__(params, defaults)
        self.param_name_map = dict(param_name_map) if param_name_map else None
        self.tau_dtype = tau_dtype
        self.sparse_tau = sparse_tau
        self._generators: dict[torch.device, torch.Generator] = {}
        self._scratch: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._deferred: tuple[NamedTensors, NamedTensors] | None = None
        self._tau_requested = False  # init_ref_param_diff was called (eagerly or deferred)
        self._layouts: dict[Tensor, FlatLayout] = {}
        self._fsdp1: dict[int, FlatLayout] = {}  # id(group) -> its FSDP1 pieces (bind_fsdp1)
        self._fsdp2: dict[int, tuple] = {}  # id(group) -> (ids of its DTensors, their layout or None)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's, plus a record of the group's own tensors: DeepSpeed later swaps them for flat
        partitions in the same group dict, and the record is how the optimizer finds their names
        and DeepSpeed's mapping of them."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if not hasattr(self, "_originals"):
            self._originals: dict[int, tuple[int, list[Tensor]]] = {}
            self._original_ids: set[int] = set()
        self._originals[id(group)] = (len(self.param_groups) - 1, list(group["params"]))
        self._original_ids.update(id(p) for p in group["params"])

    # ----- subclass hooks -------------------------------------------------------------------

    def build_task_vector(
        self, diff: Tensor, group: dict, generator: torch.Generator
    ) -> Tensor:
        """tau from the full theta_ref - theta_base of one tensor (fp32, may modify `diff`)."""
        raise NotImplementedError

    def apply_merged_update_(
        self,
        group: dict,
        slots: list[MergeSlot],
        updates: list[Tensor] | None,
        generator: torch.Generator,
        layout: FlatLayout | None = None,
    ) -> None:
        """Merge and apply the update of every slot. `updates` is the dense D per slot when
        already formed (online_step > 1), else None and the subclass forms what it needs.
        `layout` is given for a DeepSpeed partition: per-tensor quantities of shared tensors
        must then be combined across ranks, and every rank must make the same collective calls
        (even one whose slot list is empty)."""
        raise NotImplementedError

    # ----- names and tau --------------------------------------------------------------------

    def parameter_name(self, group_index: int, param_index: int) -> str:
        """The name tau is looked up by: from named parameters or from `param_name_map`."""
        group = self.param_groups[group_index]
        if self.param_name_map is not None:
            try:
                return self.param_name_map[(group_index, param_index)]
            except KeyError:
                raise TaxfreeError(
                    f"param_name_map has no name for parameter {param_index} of group "
                    f"{group_index}"
                ) from None
        if "param_names" in group:
            return group["param_names"][param_index]
        raise TaxfreeError(
            f"{type(self).__name__}: parameters have no names: pass model.named_parameters() "
            "or param_name_map={(group_index, param_index): name}"
        )

    def _original_name(self, group: dict, index: int) -> str:
        """Name of the index-th tensor the group was built with (valid after DeepSpeed swapped
        the group's params for flat partitions, unlike `parameter_name`)."""
        gi, _ = self._originals[id(group)]
        if self.param_name_map is not None:
            name = self.param_name_map.get((gi, index))
            if name is None:
                raise TaxfreeError(
                    f"param_name_map has no name for parameter {index} of group {gi}"
                )
            return name
        if "param_names" in group:
            return group["param_names"][index]
        raise TaxfreeError(
            f"{type(self).__name__}: parameters have no names: pass model.named_parameters() "
            "or param_name_map={(group_index, param_index): name}"
        )

    def original_parameters(self, group: dict) -> list[tuple[str, Tensor]]:
        """(name, tensor) of the model tensors `group` was built with."""
        _, params = self._originals.get(id(group), (0, []))
        return [(self._original_name(group, i), p) for i, p in enumerate(params)]

    @torch.no_grad()
    def init_ref_param_diff(self, ref_model: Any, base_model: Any, defer: bool = False) -> None:
        """Build tau = theta_ref - theta_base for every parameter, paired by name.

        ref/base: models, state dicts, or safetensors checkpoint paths. tau is computed on the
        full tensor (same mask / top-k as an unsharded run), then kept only as this rank's
        shard when the parameter is a DTensor or a piece of a DeepSpeed ZeRO partition.

        defer=True only records ref/base and builds tau at the first step, in whatever layout
        the parameters have by then: under DeepSpeed no rank ever holds a full-model tau, only
        its partition's. It always defers once DeepSpeed has the parameters: partitioned by
        ZeRO-3 (`deepspeed.zero.Init` or `deepspeed.initialize`: no shape to check yet), or
        the groups already holding ZeRO partitions (called after `deepspeed.initialize`).
        """
        ref = NamedTensors(ref_model, "ref")
        base = NamedTensors(base_model, "base")
        self._tau_requested = True
        own = [p for _, params in self._originals.values() for p in params]
        deepspeed_has_them = any(hasattr(p, "ds_id") for p in own) or any(
            id(p) not in self._original_ids for g in self.param_groups for p in g["params"]
        )
        if defer or deepspeed_has_them:
            self._deferred = (ref, base)
            return
        self._deferred = None
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                self._build_tau(group, self.parameter_name(gi, pi), p, ref, base)

    def _task_vector(
        self, name: str, shape: tuple[int, ...], group: dict, device: torch.device,
        ref: NamedTensors, base: NamedTensors,
    ) -> Tensor:
        """tau of one full tensor (fp32, not yet in tau_dtype); seeded by name, so every rank
        and every layout gets the same mask."""
        r, b = ref.get(name), base.get(name)
        if tuple(r.shape) != tuple(shape) or tuple(b.shape) != tuple(shape):
            hint = ""
            if "_fsdp_wrapped_module" in name.split(".") and len(shape) == 1:
                hint = (" (FSDP1 hands the optimizer 1-D pieces of its shards: call "
                        "optimizer.bind_fsdp1(fsdp_model) after wrapping)")
            raise TaxfreeError(
                f"tensor {name!r}: parameter shape {tuple(shape)}, ref "
                f"{tuple(r.shape)}, base {tuple(b.shape)}{hint}"
            )
        diff = r.to(device=device, dtype=torch.float32) - b.to(device=device, dtype=torch.float32)
        # By the name without wrapper prefixes: a DDP-wrapped ("module.") policy draws the mask a
        # plain one draws.
        generator = torch.Generator(device=device).manual_seed(mix_seed(group["seed"], "tau", canonical_name(name)))
        return self.build_task_vector(diff, group, generator)

    def _build_tau(self, group: dict, name: str, p: Tensor, ref, base) -> None:
        layout = self._fsdp1.get(id(group))
        if layout is not None:  # an FSDP1 piece: cut from the whole tensor's tau
            from taxfree.optim.fsdp1 import piece_of

            t = layout.tensor_of(p)
            full = self._task_vector(name, layout.shapes[t], group, local(p).device, ref, base)
            self._store_tau(p, piece_of(full, layout, t).to(self.tau_dtype or p.dtype))
            return
        tau = self._task_vector(name, tuple(p.shape), group, local(p).device, ref, base)
        self._store_tau(p, tau.to(self.tau_dtype or p.dtype))

    def bind_fsdp1(self, model: Any) -> None:
        """Under FSDP1 (`FullyShardedDataParallel(..., use_orig_params=True)`), call once the
        model is wrapped: learns which piece of which tensor each parameter now is, cuts a tau
        built before wrapping down to this rank's pieces, and from then on combines per-tensor
        quantities across the ranks (taxfree.optim.fsdp1)."""
        from taxfree.optim.fsdp1 import fsdp1_layout, fsdp1_pieces, piece_of

        pieces = fsdp1_pieces(model)
        for group in self.param_groups:
            layout = fsdp1_layout(self, group, pieces)
            if layout is None:
                continue
            self._fsdp1[id(group)] = layout
            for t, p in enumerate(layout.originals):
                full = self._full_tau(p, layout.numels[t])
                if full is not None and full.numel() == layout.numels[t]:
                    self._store_tau(p, piece_of(full, layout, t))

    def _full_tau(self, p: Tensor, numel: int) -> Tensor | None:
        """The tau built for a whole model tensor (before DeepSpeed took it over), flattened;
        None if there is none."""
        if p not in self.state:
            return None
        state = self.state[p]
        if "tau" in state:
            return local(state["tau"]).reshape(-1)
        if "tau_index" in state:
            out = torch.zeros(numel, dtype=state["tau_value"].dtype, device=state["tau_value"].device)
            out[state["tau_index"].long()] = state["tau_value"]
            return out
        return None

    def _build_flat_tau(self, group: dict, flat_param: Tensor, layout: FlatLayout) -> None:
        """tau in the partition's own layout: each segment is the matching slice of the full
        tensor's tau (the one built before DeepSpeed took over, or built now from the deferred
        ref/base), so masks and top-k are those of an unsharded run."""
        if not self._tau_requested:
            raise TaxfreeError(
                f"{type(self).__name__}.step() before init_ref_param_diff(ref, base): the "
                "DeepSpeed partition has no task vector"
            )
        dtype = self.tau_dtype or layout.dtype
        tau = torch.zeros(flat_param.numel(), dtype=dtype, device=flat_param.device)
        for seg in layout.segments:
            original = layout.originals[seg.tensor]
            full = self._full_tau(original, layout.numels[seg.tensor])
            if full is None:
                if self._deferred is None:
                    raise TaxfreeError(
                        f"{type(self).__name__}: no task vector for {layout.names[seg.tensor]!r}"
                    )
                ref, base = self._deferred
                full = self._task_vector(
                    layout.names[seg.tensor], layout.shapes[seg.tensor], group,
                    flat_param.device, ref, base,
                ).reshape(-1)
            tau[seg.start : seg.start + seg.numel] = full[seg.offset : seg.offset + seg.numel].to(dtype)
        self._store_tau(flat_param, tau)
        for original in layout.originals:  # the whole-tensor taus are no longer needed
            if original in self.state:
                for key in _TAU_KEYS:
                    self.state[original].pop(key, None)
                if not self.state[original]:
                    del self.state[original]

    def flat_layout(self, group: dict, p: Tensor) -> FlatLayout | None:
        """The FlatLayout of `p` when it is a DeepSpeed ZeRO partition that took the place of
        the group's own tensors; None for the group's own tensors (and anything else)."""
        if id(p) in self._original_ids:
            return None
        layout = self._layouts.get(p)
        if layout is None:
            from taxfree.optim.deepspeed import zero_flat_layout

            layout = zero_flat_layout(self, group, p)
            if layout is not None:
                self._layouts[p] = layout
        return layout

    def _store_tau(self, p: Tensor, tau: Tensor) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        state = self.state[p]
        for key in _TAU_KEYS:
            state.pop(key, None)
        if isinstance(p, DTensor):
            tau = distribute_tensor(tau, p.device_mesh, p.placements, src_data_rank=None)
        tau_local = local(tau)
        n = tau_local.numel()
        index_dtype = torch.int32 if n < 2**31 else torch.int64
        nnz = int(torch.count_nonzero(tau_local).item())
        sparse_bytes = nnz * (index_dtype.itemsize + tau_local.element_size())
        sparse = self.sparse_tau
        if sparse is None:
            sparse = sparse_bytes * 2 <= n * tau_local.element_size()
        if sparse:
            index = torch.nonzero(flat(tau_local.contiguous())).squeeze(1)
            state["tau_index"] = index.to(index_dtype)
            state["tau_value"] = tau_local.reshape(-1).index_select(0, index)
        else:
            state["tau"] = tau

    def tau_dense(self, p: Tensor) -> Tensor:
        """This rank's tau of parameter `p` as a dense local tensor (for inspection and tests)."""
        state = self.state[p]
        if "tau" in state:
            return local(state["tau"]).clone()
        if "tau_index" not in state:
            raise TaxfreeError("init_ref_param_diff() has not been called")
        out = torch.zeros(local(p).numel(), dtype=state["tau_value"].dtype, device=local(p).device)
        out[state["tau_index"].long()] = state["tau_value"]
        return out.view_as(local(p))

    # ----- step -----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            buckets: dict[Any, list[tuple[int, Tensor]]] = {}
            layouts: dict[Any, FlatLayout] = {}
            pieces, fsdp1 = self._piece_layout(gi, group)
            for pi, p in enumerate(group["params"]):
                if pieces is not None and local(p).numel() == 0:
                    continue  # a piece held by other ranks
                if p.grad is None:
                    if fsdp1:
                        raise TaxfreeError(f"{type(self).__name__} under FSDP1: parameter {self._describe(gi, pi)} "
                                           "has no gradient (frozen parameters need a param group of their own)")
                    continue
                if p.grad.is_sparse:
                    raise TaxfreeError(f"{type(self).__name__} does not support sparse gradients")
                layout = pieces if pieces is not None else self.flat_layout(group, p)
                if layout is None and id(p) not in self._original_ids:
                    self._adopt_replacement(group, pi, p)
                state = self.state[p]
                if not any(k in state for k in _TAU_KEYS):
                    if layout is not None and not layout.per_param:
                        self._build_flat_tau(group, p, layout)
                    elif self._deferred is not None and id(p) in self._original_ids:
                        self._build_deferred_own(group, p)
                    else:
                        raise TaxfreeError(
                            f"{type(self).__name__}.step() before init_ref_param_diff(ref, base): "
                            f"parameter {self._describe(gi, pi)} has no task vector"
                        )
                if "step" not in state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["online_step"] > 1 and "cached_update" not in state:
                    state["cached_update"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                lp = local(p)
                key: Any = (lp.device, lp.dtype)
                if pieces is not None:  # every piece of the group in one bucket, its reductions shared
                    key = ("pieces", id(group))
                    layouts[key] = layout
                elif layout is not None:  # a partition steps alone: its reductions are per partition
                    key = ("partition", id(p))
                    layouts[key] = layout
                buckets.setdefault(key, []).append((pi, p))
            if pieces is not None:
                if not buckets:  # no piece here: still take part in the reductions
                    buckets[("pieces", id(group))] = []
                    layouts[("pieces", id(group))] = pieces
                if not fsdp1:  # FSDP2: tensors without a gradient (on every rank) sit this step out
                    stepped = [p.grad is not None for p in group["params"]]
                    if not all(stepped):
                        layouts[("pieces", id(group))] = replace(
                            pieces, shared=[s and g for s, g in zip(pieces.shared, stepped)]
                        )
            if not buckets:
                continue
            group["group_step"] += 1
            for bi, (key, members) in enumerate(buckets.items()):
                layout = layouts.get(key)
                device = local(members[0][1]).device if members else layout.device
                if layout is None:
                    seed = mix_seed(group["seed"], gi, group["group_step"], bi)
                else:  # group index and rank: different partitions draw different masks
                    seed = mix_seed(group["seed"], group["group_step"], "zero", *layout.seed_key)
                generator = self._generator(device).manual_seed(seed)
                self._step_bucket(group, [p for _, p in members], generator, layout)
        return loss

    def _piece_layout(self, group_index: int, group: dict) -> tuple[FlatLayout | None, bool]:
        """(layout, is FSDP1) when the group's parameters are pieces of tensors spread over ranks:
        FSDP1 pieces (`bind_fsdp1`) or FSDP2 DTensors (found here, once per set of parameters);
        (None, False) otherwise."""
        layout = self._fsdp1.get(id(group))
        if layout is not None:
            return layout, True
        from torch.distributed.tensor import DTensor

        params = group["params"]
        if not params or not isinstance(params[0], DTensor):
            return None, False
        for pi, p in enumerate(params):  # accelerate's FSDP2 switch, before the layout is read
            if id(p) not in self._original_ids:
                self._adopt_replacement(group, pi, p)
        key = tuple(id(p) for p in params)
        cached = self._fsdp2.get(id(group))
        if cached is None or cached[0] != key:
            from taxfree.optim.fsdp2 import dtensor_layout

            cached = (key, dtensor_layout(self, group, group_index))
            self._fsdp2[id(group)] = cached
        return cached[1], False

    def _adopt_replacement(self, group: dict, index: int, p: Tensor) -> None:
        """accelerate's FSDP2 preparation puts a sharded DTensor copy of each tensor in its place
        in the param group (`fsdp2_switch_optimizer_parameters`): take it as the group's own
        tensor at that position (same shape), and move its tau over, re-sharded like it."""
        record = self._originals.get(id(group))
        if record is None or len(record[1]) != len(group["params"]):
            return
        old = record[1][index]
        if tuple(old.shape) != tuple(p.shape):
            return
        record[1][index] = p
        self._original_ids.discard(id(old))
        self._original_ids.add(id(p))
        full = self._full_tau(old, old.numel())
        self.state.pop(old, None)
        if full is not None:
            self._store_tau(p, full.view(old.shape).to(local(p).device))

    def _build_deferred_own(self, group: dict, p: Tensor) -> None:
        """Deferred tau of one of the group's own tensors (no DeepSpeed after all)."""
        _, originals = self._originals[id(group)]
        index = next(i for i, q in enumerate(originals) if q is p)
        ref, base = self._deferred
        self._build_tau(group, self._original_name(group, index), p, ref, base)

    def _describe(self, gi: int, pi: int) -> str:
        try:
            return repr(self.parameter_name(gi, pi))
        except TaxfreeError:
            return f"{pi} of group {gi}"

    def scratch(self, like: Tensor) -> Tensor:
        """A flat buffer of like's size, device and dtype, reused across steps (grown to the
        largest tensor): the dense temporaries of a merge need no allocation per step."""
        return self.scratch_of(like.numel(), like.dtype, like.device)

    def scratch_of(self, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (device, dtype)
        buffer = self._scratch.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, device=device, dtype=dtype)
            self._scratch[key] = buffer
        return buffer[:numel]

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device]

    def _step_bucket(
        self,
        group: dict,
        params: list[Tensor],
        generator: torch.Generator,
        layout: FlatLayout | None = None,
    ) -> None:
        """The Adam part over whole tensors (flat partitions included: it is elementwise), then
        the merge over slots: one per tensor, or one per tensor piece of a partition."""
        if not params:  # an FSDP1 rank holding none of the group's tensors: only the reductions
            k = group["online_step"]
            if k == 1 or group["group_step"] % k == 0:
                self.apply_merged_update_(group, [], None, generator, layout)
            return
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        lr = float(group["lr"])
        P = [local(p) for p in params]
        G = [local(p.grad) for p in params]
        M = [local(s["exp_avg"]) for s in states]
        V = [local(s["exp_avg_sq"]) for s in states]
        hp = dict(lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
        fused = self._fused_pass(group, P, G, M, V)
        if fused:  # the merge rule runs the moment update itself, in one pass with what it needs
            coefficients = count_steps_([s["step"] for s in states], **hp)
        else:
            coefficients = advance_moments_(P, G, M, V, [s["step"] for s in states], **hp)
        k = group["online_step"]
        merge_at = [i for i, s in enumerate(states) if k == 1 or int(s["step"].item()) % k == 0]
        if k > 1:
            # Between merges: plain AdamW, remembering the sum of the applied updates.
            merging = set(merge_at)
            plain = [i for i in range(len(states)) if i not in merging]
            if plain:
                updates = adam_updates(
                    [local(states[i]["exp_avg"]) for i in plain],
                    [local(states[i]["exp_avg_sq"]) for i in plain],
                    [coefficients[i] for i in plain],
                )
                torch._foreach_add_([P[i] for i in plain], updates)
                torch._foreach_add_([local(states[i]["cached_update"]) for i in plain], updates)
        if not merge_at:
            return
        updates = None
        if k > 1:
            # Revert the cached updates and merge their sum with this step's update once.
            caches = [local(states[i]["cached_update"]) for i in merge_at]
            updates = adam_updates(
                [local(states[i]["exp_avg"]) for i in merge_at],
                [local(states[i]["exp_avg_sq"]) for i in merge_at],
                [coefficients[i] for i in merge_at],
            )
            torch._foreach_sub_([P[i] for i in merge_at], caches)
            torch._foreach_add_(updates, caches)
            torch._foreach_zero_(caches)
        if layout is None or layout.per_param:  # one slot per parameter (FSDP1: a piece of a tensor)
            slots = []
            for i in merge_at:
                t = layout.tensor_of(params[i]) if layout is not None else None
                slots.append(MergeSlot(
                    param=P[i],
                    exp_avg=local(states[i]["exp_avg"]),
                    exp_avg_sq=local(states[i]["exp_avg_sq"]),
                    coefficients=coefficients[i],
                    tau=local(states[i]["tau"]) if "tau" in states[i] else None,
                    tau_index=states[i].get("tau_index"),
                    tau_value=states[i].get("tau_value"),
                    numel=layout.numels[t] if t is not None else 0,
                    tensor=t,
                    grad=flat(G[i]) if fused else None,
                ))
        else:
            (i,) = merge_at  # a partition is stepped alone
            slots = [segment_slot(P[i], states[i], coefficients[i], s, layout) for s in layout.segments]
            if fused:
                for slot, seg in zip(slots, layout.segments):
                    slot.grad = flat(G[i]).narrow(0, seg.start, seg.numel)
                self._moments_between_segments_(P[i], G[i], M[i], V[i], coefficients[i], layout)
            if updates is not None:
                updates = [updates[0].narrow(0, s.start, s.numel) for s in layout.segments]
        self.apply_merged_update_(group, slots, updates, generator, layout)

    @staticmethod
    def _fused_pass(group: dict, *tensors: list[Tensor]) -> bool:
        """Whether the merge rule runs the moment update in the fused CPU pass
        (taxfree.optim.cpu_kernel): only where something is trimmed (reserve_p < 1; with nothing
        trimmed the torch ops keep the optimizers bit for bit torch.optim.AdamW), with a merge at
        every step, on contiguous fp32 CPU tensors, and when the kernel built."""
        if group["online_step"] != 1 or group["reserve_p"] >= 1.0:
            return False
        if not all(cpu_kernel.usable(*ts) for ts in tensors):
            return False
        return cpu_kernel.kernel() is not None

    @staticmethod
    def _moments_between_segments_(p, g, m, v, coefficients, layout: FlatLayout) -> None:
        """The fused path updates moments per tensor piece: the entries of a flat partition that
        belong to no piece (alignment padding) get theirs here, as the elementwise torch path
        gives them."""
        kern = cpu_kernel.kernel()
        start = 0
        for seg in sorted(layout.segments, key=lambda s: s.start) + [None]:
            end = seg.start if seg is not None else p.numel()
            if end > start:
                kern.update(flat(p).narrow(0, start, end - start), flat(g).narrow(0, start, end - start),
                            flat(m).narrow(0, start, end - start), flat(v).narrow(0, start, end - start),
                            coefficients)
            if seg is not None:
                start = seg.start + seg.numel

    def moments_(self, slot: "MergeSlot", d_out: Tensor | None = None, l1: bool = False) -> float | None:
        """For a slot whose moment update is pending (`slot.grad` set): the fused pass (decay,
        moments; D into d_out; returns sum |D| when l1). Then `slot.grad` is cleared."""
        c = slot.coefficients
        total = cpu_kernel.kernel().update(
            flat(slot.param) if c.decay != 1.0 else None, slot.grad, flat(slot.exp_avg),
            flat(slot.exp_avg_sq), c, d_out=d_out, l1=l1,
        )
        slot.grad = None
        return total

    # ----- state ----------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load, except tau keeps its stored dtypes: torch casts every state tensor of a
        floating-point parameter to the parameter's dtype, which would turn the sparse tau's
        int indices into floats and undo `tau_dtype`."""
        taus: dict[Any, dict[str, Tensor]] = {}
        kept: dict[Any, dict[str, Any]] = {}
        for pid, s in state_dict["state"].items():
            taus[pid] = {k: v for k, v in s.items() if k in _TAU_KEYS}
            kept[pid] = {k: v for k, v in s.items() if k not in _TAU_KEYS}
        before = list(self.param_groups)
        super().load_state_dict({**state_dict, "state": kept})
        # torch makes new group dicts: move the record of each group's own tensors over
        for old, new in zip(before, self.param_groups):
            if id(old) in self._originals:
                self._originals[id(new)] = self._originals.pop(id(old))
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for pid, p in zip(saved_group["params"], group["params"]):
                device = local(p).device
                for key, value in taus.get(pid, {}).items():
                    self.state[p][key] = value.to(device=device)


_DTYPES = ("float32", "bfloat16", "float16")

# The settings OnDARE and OnTIES share, named as in the authors' code; defaults are the authors'
# DPO runs (the class constructors default to a plain AdamW instead: q = 1, no merge).
MERGING_HYPERPARAMETERS = (
    Param("reserve_p", 0.01, float, "fraction q of the update's entries kept", within="(0, 1]"),
    Param("alpha", 1e-7, float, "weight of tau in p += alpha*tau + (1 - alpha)*D'", within="[0, 1]"),
    Param("use_merge", True, bool, "add tau at all (false: only sparsify the update)"),
    Param("rescale", False, bool, "L1-rescale the kept update to the full update's norm"),
    Param("online_step", 1, int, "merge every K steps (plain AdamW steps in between)", within=">= 1"),
    Param("clip_tau", 1.0, float, "clamp of tau's entries (OnDARE)", within="> 0"),
    Param("tau_dtype", None, str | None, "dtype tau is stored in (null: the parameter's)",
          check=lambda v: None if v in _DTYPES else f"{v!r} is not one of {', '.join(_DTYPES)}",
          convert=lambda v: getattr(torch, v)),
    Param("sparse_tau", None, bool | None, "store tau as indices + values (null: when at most half the dense bytes)"),
)

