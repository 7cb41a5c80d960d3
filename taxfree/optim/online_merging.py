"""The part OnDARE-AdamW and OnTIES-AdamW share: AdamW moments, tau, online_step, state.

Each step runs torch.optim.AdamW's maths over all parameters of a group with foreach ops, then
hands the update D of every parameter to the subclass's merge rule (ALGORITHMS.md 1.3, 1.4).
The task vector tau lives in the optimizer state (dense, or as flat indices + values when that
is much smaller), so `state_dict()`/`load_state_dict()` carry it and a resumed run continues
exactly. Masks are drawn from a generator re-seeded from (seed, group, step): no RNG state to
save, and every DDP rank draws the same mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from taxfree.errors import TaxfreeError
from taxfree.optim.adamw_math import AdamCoefficients, adam_updates, advance_moments_
from taxfree.optim.named_tensors import NamedTensors
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
    ) -> None:
        """Merge and apply the update of every slot. `updates` is the dense D per slot when
        already formed (online_step > 1), else None and the subclass forms what it needs."""
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

    @torch.no_grad()
    def init_ref_param_diff(self, ref_model: Any, base_model: Any) -> None:
        """Build tau = theta_ref - theta_base for every parameter, paired by name.

        ref/base: models, state dicts, or safetensors checkpoint paths. tau is computed on the
        full tensor (same mask / top-k as an unsharded run), then kept only as this rank's
        shard when the parameter is a DTensor.
        """
        ref = NamedTensors(ref_model, "ref")
        base = NamedTensors(base_model, "base")
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                name = self.parameter_name(gi, pi)
                r, b = ref.get(name), base.get(name)
                if r.shape != p.shape or b.shape != p.shape:
                    raise TaxfreeError(
                        f"tensor {name!r}: parameter shape {tuple(p.shape)}, ref "
                        f"{tuple(r.shape)}, base {tuple(b.shape)}"
                    )
                device = local(p).device
                diff = r.to(device=device, dtype=torch.float32) - b.to(
                    device=device, dtype=torch.float32
                )
                generator = torch.Generator(device=device).manual_seed(
                    mix_seed(group["seed"], "tau", name)
                )
                tau = self.build_task_vector(diff, group, generator)
                self._store_tau(p, tau.to(self.tau_dtype or p.dtype))

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
            buckets: dict[tuple[torch.device, torch.dtype], list[tuple[int, Tensor]]] = {}
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TaxfreeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                if not any(k in state for k in _TAU_KEYS):
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
                buckets.setdefault((lp.device, lp.dtype), []).append((pi, p))
            if not buckets:
                continue
            group["group_step"] += 1
            for bi, members in enumerate(buckets.values()):
                device = local(members[0][1]).device
                generator = self._generator(device).manual_seed(
                    mix_seed(group["seed"], gi, group["group_step"], bi)
                )
                self._step_bucket(group, [p for _, p in members], generator)
        return loss

    def _describe(self, gi: int, pi: int) -> str:
        try:
            return repr(self.parameter_name(gi, pi))
        except TaxfreeError:
            return f"{pi} of group {gi}"

    def scratch(self, like: Tensor) -> Tensor:
        """A flat buffer of like's size, device and dtype, reused across steps (grown to the
        largest tensor): the dense temporaries of a merge need no allocation per step."""
        key = (like.device, like.dtype)
        buffer = self._scratch.get(key)
        if buffer is None or buffer.numel() < like.numel():
            buffer = torch.empty(like.numel(), device=like.device, dtype=like.dtype)
            self._scratch[key] = buffer
        return buffer[: like.numel()]

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device]

    def _step_bucket(self, group: dict, params: list[Tensor], generator: torch.Generator) -> None:
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        lr = float(group["lr"])
        P = [local(p) for p in params]
        coefficients = advance_moments_(
            P,
            [local(p.grad) for p in params],
            [local(s["exp_avg"]) for s in states],
            [local(s["exp_avg_sq"]) for s in states],
            [s["step"] for s in states],
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
        )
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
        slots = [
            MergeSlot(
                param=P[i],
                exp_avg=local(states[i]["exp_avg"]),
                exp_avg_sq=local(states[i]["exp_avg_sq"]),
                coefficients=coefficients[i],
                tau=local(states[i]["tau"]) if "tau" in states[i] else None,
                tau_index=states[i].get("tau_index"),
                tau_value=states[i].get("tau_value"),
            )
            for i in merge_at
        ]
        updates = None
        if k > 1:
            # Revert the cached updates and merge their sum with this step's update once.
            caches = [local(states[i]["cached_update"]) for i in merge_at]
            updates = adam_updates(
                [s.exp_avg for s in slots], [s.exp_avg_sq for s in slots],
                [s.coefficients for s in slots],
            )
            torch._foreach_sub_([s.param for s in slots], caches)
            torch._foreach_add_(updates, caches)
            torch._foreach_zero_(caches)
        self.apply_merged_update_(group, slots, updates, generator)

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
        super().load_state_dict({**state_dict, "state": kept})
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for pid, p in zip(saved_group["params"], group["params"]):
                device = local(p).device
                for key, value in taus.get(pid, {}).items():
                    self.state[p][key] = value.to(device=device)
