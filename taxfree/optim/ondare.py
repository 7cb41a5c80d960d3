"""OnDARE-AdamW: AdamW whose update is randomly sparsified (DARE) and merged with tau.

docs/algorithms.md 1.2 and 1.3.

With reserve_p = q < 1 the kept positions are drawn as geometric gaps (about q*n random
numbers) and D is computed at those positions only: the Adam moments still update everywhere,
but no dense update tensor is formed. On a CPU the moment update (and, with rescale, |D|_1) is
one fused pass over g, m, v (taxfree.optim.cpu_kernel), so a step costs about what torch's fused
AdamW costs; elsewhere torch's foreach ops do it. A sparse tau adds only its q*n entries.

Under DeepSpeed ZeRO a slot may be one rank's piece of a tensor: the mask is then drawn over the
piece (a different, equally distributed mask than unsharded), and the rescale's two L1 norms
are summed over the tensor's pieces on all ranks before they are used.
"""

from __future__ import annotations

import torch
from torch import Tensor

from taxfree.optim import cpu_kernel
from taxfree.optim.adamw_math import adam_update_at, adam_updates, signed_at, update_magnitude
from taxfree.optim.online_merging import MERGING_HYPERPARAMETERS, MergeSlot, OnlineMergingAdamW, add_tau_, flat
from taxfree.optim.sharded import FlatLayout, tensor_sums
from taxfree.optim.registry import OptimizerSpec
from taxfree.optim.sparsify import bernoulli_positions


class OnDAREAdamW(OnlineMergingAdamW):
    """Online DARE merging on top of torch.optim.AdamW.

    Args beyond AdamW's: reserve_p (q, fraction of entries kept), alpha (weight of tau),
    use_merge (add tau at all), rescale (L1 rescale of the dropped update, clamped to
    +-clip_tau), online_step (merge every K steps), clip_tau (clamp of tau), param_name_map
    ({(group_idx, param_idx): name} when params are not named), seed (mask seed), tau_dtype,
    sparse_tau (None: store tau sparsely when that is at most half the dense bytes).
    Call `init_ref_param_diff(ref, base)` before the first step.
    """

    def build_task_vector(self, diff: Tensor, group: dict, generator: torch.Generator) -> Tensor:
        q = group["reserve_p"]
        if q < 1.0:
            kept = bernoulli_positions(diff.numel(), q, generator, diff.device)
            tau = torch.zeros_like(diff)
            flat(tau).index_copy_(0, kept, flat(diff).index_select(0, kept).div_(q))
            diff = tau
        return diff.clamp_(-group["clip_tau"], group["clip_tau"])

    def apply_merged_update_(
        self,
        group: dict,
        slots: list[MergeSlot],
        updates: list[Tensor] | None,
        generator: torch.Generator,
        layout: FlatLayout | None = None,
    ) -> None:
        q, alpha = group["reserve_p"], group["alpha"]
        use_merge, rescale = group["use_merge"], group["rescale"]
        weight = 1.0 - alpha if use_merge else 1.0
        across_ranks = layout is not None and layout.any_shared
        if q >= 1.0:
            if updates is None:
                updates = adam_updates(
                    [s.exp_avg for s in slots], [s.exp_avg_sq for s in slots],
                    [s.coefficients for s in slots],
                )
            if rescale:  # nothing dropped: |D_drop|_1 = |D|_1, only the clamp can bite
                norms = [torch.linalg.vector_norm(d, 1) for d in updates]
                if across_ranks:
                    local_sums = torch.stack(norms).double() if norms else torch.zeros(0)
                    totals = self._sums(layout, slots, local_sums).squeeze(1).tolist()
                    for d, total in zip(updates, totals):
                        self._rescale_(d, total, total, group)
                else:
                    for d, norm in zip(updates, norms):
                        self._rescale_(d, norm.item(), norm, group)
            if slots:
                if weight == 1.0:
                    torch._foreach_add_([s.param for s in slots], updates)
                else:
                    torch._foreach_add_([s.param for s in slots], updates, alpha=weight)
            done = set()
        else:
            done = self._apply_dropped_(group, slots, updates, generator, q, weight, across_ranks, layout)
        if use_merge and alpha != 0.0:
            add_tau_([s for i, s in enumerate(slots) if i not in done], alpha)

    @staticmethod
    def _sums(layout: FlatLayout, slots: list[MergeSlot], local_sums: Tensor) -> Tensor:
        """Per-slot partial sums (rows) summed over the slot's tensor on every rank."""
        return tensor_sums(layout, [s.tensor for s in slots], local_sums)

    def _apply_dropped_(
        self, group, slots, updates, generator, q, weight, across_ranks=False, layout=None
    ) -> set[int]:
        """p += weight * dropout(D, keep=q) with one mask draw across the whole bucket. Returns
        the slots whose alpha * tau was added too (the fused pass adds it on the way)."""
        rescale = group["rescale"]
        tau_alpha = group["alpha"] if group["use_merge"] else 0.0
        done = set()
        positions = bounds = None
        if slots:
            device = slots[0].param.device
            sizes = [s.param.numel() for s in slots]
            offsets = torch.tensor([0] + sizes, device=device).cumsum(0)
            positions = bernoulli_positions(int(offsets[-1].item()), q, generator, device)
            bounds = torch.searchsorted(positions, offsets).tolist()
        pending = []  # across ranks: the rescale waits for the tensors' global L1 norms
        for i, slot in enumerate(slots):
            index = positions[bounds[i] : bounds[i + 1]] - offsets[i]
            full_l1 = None
            if slot.grad is not None and not rescale:  # the whole step in the fused CPU pass
                sparse = slot.tau_index is not None and cpu_kernel.usable(slot.tau_value) \
                    and slot.tau_index.dtype == torch.int32 and tau_alpha != 0.0
                cpu_kernel.kernel().update_apply(
                    flat(slot.param), slot.grad, flat(slot.exp_avg), flat(slot.exp_avg_sq),
                    slot.coefficients, index, q, weight, slot.tau_index if sparse else None,
                    slot.tau_value if sparse else None, tau_alpha,
                )
                slot.grad = None
                if sparse:
                    done.add(i)
                continue
            if slot.grad is not None:  # the fused CPU pass: moments and |D|_1, then D at index
                full_l1 = self.moments_(slot, l1=rescale)
                kept = cpu_kernel.kernel().at(flat(slot.exp_avg), flat(slot.exp_avg_sq), index,
                                              slot.coefficients)
            elif updates is not None:
                kept = flat(updates[i]).index_select(0, index)
                if rescale:
                    full_l1 = torch.linalg.vector_norm(updates[i], 1).item()
            elif rescale:  # |D|_1 needs every entry: u ~ |D| in a scratch buffer
                c = slot.coefficients
                u = update_magnitude(slot.exp_avg, slot.exp_avg_sq, c, self.scratch(slot.param))
                full_l1 = u.sum(dtype=torch.float64).item() * abs(c.step_size * c.bc2_sqrt)
                kept = signed_at(u, slot.exp_avg, index, c)
            else:  # D at the kept positions only
                kept = adam_update_at(slot.exp_avg, slot.exp_avg_sq, index, slot.coefficients)
            kept.div_(q)
            if full_l1 is not None:
                kept_l1 = torch.linalg.vector_norm(kept, 1)
                if across_ranks:
                    pending.append((slot, index, kept, full_l1, kept_l1.item()))
                    continue
                self._rescale_(kept, full_l1, kept_l1, group)
            flat(slot.param).index_add_(0, index, kept, alpha=weight)
        if across_ranks and rescale:
            local_sums = torch.tensor([[full, part] for _, _, _, full, part in pending],
                                      dtype=torch.float64).reshape(-1, 2)
            totals = self._sums(layout, [p[0] for p in pending], local_sums).tolist()
            for (slot, index, kept, _, _), (full_l1, kept_l1) in zip(pending, totals):
                self._rescale_(kept, full_l1, kept_l1, group)
                flat(slot.param).index_add_(0, index, kept, alpha=weight)
        return done

    @staticmethod
    def _rescale_(kept: Tensor, full_l1: float, kept_l1: float | Tensor, group: dict) -> None:
        """kept *= |D|_1 / (|D_drop|_1 + eps), clamped to +-clip_tau (skipped when |D|_1 < 1e-8).
        Both norms are of the whole tensor (summed over ranks when it is sharded)."""
        if full_l1 >= 1e-8:
            kept.mul_(full_l1 / (kept_l1 + group["eps"]))
            kept.clamp_(-group["clip_tau"], group["clip_tau"])


OPTIMIZER = OptimizerSpec("ondare", OnDAREAdamW, "online DARE: a random q of the update kept (scaled 1/q), plus alpha*tau",
                          hyperparameters=MERGING_HYPERPARAMETERS, merging=True)
