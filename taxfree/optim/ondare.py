"""OnDARE-AdamW: AdamW whose update is randomly sparsified (DARE) and merged with tau.

ALGORITHMS.md 1.2 and 1.3. With reserve_p = q < 1 and no rescale, the kept positions are drawn
as geometric gaps (about q*n random numbers) and D is computed at those positions only: the
Adam moments still update everywhere, but no dense update tensor is formed, so a step costs
less than AdamW's. A sparse tau adds only its q*n entries.
"""

from __future__ import annotations

import torch
from torch import Tensor

from taxfree.optim.adamw_math import adam_update_at, adam_updates, signed_at, update_magnitude
from taxfree.optim.online_merging import MergeSlot, OnlineMergingAdamW, add_tau_, flat
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
    ) -> None:
        q, alpha = group["reserve_p"], group["alpha"]
        use_merge, rescale = group["use_merge"], group["rescale"]
        weight = 1.0 - alpha if use_merge else 1.0
        if q >= 1.0:
            if updates is None:
                updates = adam_updates(
                    [s.exp_avg for s in slots], [s.exp_avg_sq for s in slots],
                    [s.coefficients for s in slots],
                )
            if rescale:  # nothing dropped: |D_drop|_1 = |D|_1, only the clamp can bite
                for d in updates:
                    self._rescale_(d, torch.linalg.vector_norm(d, 1).item(), group)
            if weight == 1.0:
                torch._foreach_add_([s.param for s in slots], updates)
            else:
                torch._foreach_add_([s.param for s in slots], updates, alpha=weight)
        else:
            self._apply_dropped_(group, slots, updates, generator, q, weight)
        if use_merge and alpha != 0.0:
            add_tau_(slots, alpha)

    def _apply_dropped_(self, group, slots, updates, generator, q, weight) -> None:
        """p += weight * dropout(D, keep=q) with one mask draw across the whole bucket."""
        device = slots[0].param.device
        sizes = [s.param.numel() for s in slots]
        offsets = torch.tensor([0] + sizes, device=device).cumsum(0)
        positions = bernoulli_positions(int(offsets[-1].item()), q, generator, device)
        bounds = torch.searchsorted(positions, offsets).tolist()
        for i, slot in enumerate(slots):
            index = positions[bounds[i] : bounds[i + 1]] - offsets[i]
            full_l1 = None
            if updates is not None:
                kept = flat(updates[i]).index_select(0, index)
                if group["rescale"]:
                    full_l1 = torch.linalg.vector_norm(updates[i], 1).item()
            elif group["rescale"]:  # |D|_1 needs every entry: u ~ |D| in a scratch buffer
                c = slot.coefficients
                u = update_magnitude(slot.exp_avg, slot.exp_avg_sq, c, self.scratch(slot.param))
                full_l1 = u.sum(dtype=torch.float64).item() * abs(c.step_size * c.bc2_sqrt)
                kept = signed_at(u, slot.exp_avg, index, c)
            else:  # D at the kept positions only
                kept = adam_update_at(slot.exp_avg, slot.exp_avg_sq, index, slot.coefficients)
            kept.div_(q)
            if full_l1 is not None:
                self._rescale_(kept, full_l1, group)
            flat(slot.param).index_add_(0, index, kept, alpha=weight)

    @staticmethod
    def _rescale_(kept: Tensor, full_l1: float, group: dict) -> None:
        """kept *= |D|_1 / (|D_drop|_1 + eps), clamped to +-clip_tau (skipped when |D|_1 < 1e-8)."""
        if full_l1 >= 1e-8:
            kept_l1 = torch.linalg.vector_norm(kept, 1)
            kept.mul_(full_l1 / (kept_l1 + group["eps"]))
            kept.clamp_(-group["clip_tau"], group["clip_tau"])
