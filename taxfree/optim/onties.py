"""OnTIES-AdamW: AdamW whose update is trimmed to its top-k entries and sign-elected with tau.

docs/algorithms.md 1.2 and 1.4. Top-k is exact by threshold (`topk_positions`: a sampled lower bound
plus an exact selection on about 1.2*k candidates, no sort of the whole tensor). The election
runs densely where tau is dense; with a sparse tau the trimmed update is applied first and
then corrected at tau's q*n positions only, which is the same arithmetic because the election
cannot drop anything where tau is zero.

Under DeepSpeed ZeRO a slot may be one rank's piece of a tensor. k is then q times the whole
tensor's size, the threshold of a tensor spread over ranks is found exactly across them
(`sharded.kth_largest`), and the rescale's L1 norms are summed over the tensor's pieces, so the
kept entries and the scale are those of an unsharded run.
"""

from __future__ import annotations

import torch
from torch import Tensor

from taxfree.optim.adamw_math import adam_updates, signed_at, update_magnitude
from taxfree.optim.online_merging import MERGING_HYPERPARAMETERS, MergeSlot, OnlineMergingAdamW, flat
from taxfree.optim.sharded import FlatLayout, kth_largest, tensor_sums
from taxfree.optim.registry import OptimizerSpec
from taxfree.params import Param
from taxfree.optim.sparsify import topk_positions


def _kept_count(group: dict, numel: int) -> int | None:
    """k of the top-k trim, or None when nothing is trimmed (q >= 1 or k < 1, as the authors)."""
    q = group["reserve_p"]
    k = int(q * numel)
    return None if q >= 1.0 or k < 1 else k


class OnTIESAdamW(OnlineMergingAdamW):
    """Online TIES merging on top of torch.optim.AdamW.

    Args beyond AdamW's: reserve_p (q, fraction of entries kept by magnitude), alpha (weight
    of tau), use_merge (add tau at all), rescale (L1 rescale after trimming, of tau and of the
    update), online_step (merge every K steps), param_name_map, seed, tau_dtype, sparse_tau,
    weighted_election (False: elect signs on tau + D_k as the authors' code does; True: on
    alpha*tau + (1-alpha)*D_k as the paper's equations). clip_tau is accepted for a uniform
    signature and not used (the authors' OnTIES clamps nothing).
    Call `init_ref_param_diff(ref, base)` before the first step.
    """

    def __init__(self, params, *args, weighted_election: bool = False, **kwargs):
        super().__init__(params, *args, **kwargs)
        self.defaults["weighted_election"] = bool(weighted_election)
        for group in self.param_groups:
            group.setdefault("weighted_election", bool(weighted_election))

    def build_task_vector(self, diff: Tensor, group: dict, generator: torch.Generator) -> Tensor:
        k = _kept_count(group, diff.numel())
        if k is None:
            return diff
        values = flat(diff)
        kept, _ = topk_positions(values.abs(), k)
        tau = torch.zeros_like(values)
        tau.index_copy_(0, kept, values.index_select(0, kept))
        if group["rescale"]:
            full_l1 = torch.linalg.vector_norm(values, 1)
            if full_l1.item() >= 1e-8:
                tau.mul_(full_l1 / torch.linalg.vector_norm(tau, 1))
        return tau.view_as(diff)

    def apply_merged_update_(
        self,
        group: dict,
        slots: list[MergeSlot],
        updates: list[Tensor] | None,
        generator: torch.Generator,
        layout: FlatLayout | None = None,
    ) -> None:
        use_merge, alpha = group["use_merge"], group["alpha"]
        tau_weight = alpha if use_merge else 0.0
        update_weight = 1.0 - alpha if use_merge else 1.0
        trims = [_kept_count(group, s.full_numel) for s in slots]
        if updates is not None:  # online_step > 1: the dense D (with the cached sum) is given
            updates = list(updates)
        else:  # AdamW's exact D where nothing is trimmed; u ~ |D| in a scratch buffer elsewhere
            untrimmed = [i for i, k in enumerate(trims) if k is None]
            exact = adam_updates(
                [slots[i].exp_avg for i in untrimmed], [slots[i].exp_avg_sq for i in untrimmed],
                [slots[i].coefficients for i in untrimmed],
            )
            updates = [None] * len(slots)
            for i, d in zip(untrimmed, exact):
                updates[i] = d
        if layout is not None and layout.any_shared:
            self._merge_across_ranks_(group, slots, updates, trims, layout, tau_weight, update_weight)
            return
        self._merge_each_(group, slots, updates, trims, range(len(slots)), tau_weight, update_weight)

    def _merge_each_(self, group, slots, updates, trims, indices, tau_weight, update_weight) -> None:
        """Merge the slots at `indices` one by one, each trimmed within itself (a whole tensor,
        or a piece of one no other rank shares)."""
        for i in indices:
            slot = slots[i]
            d = flat(updates[i]) if updates[i] is not None else None
            magnitude = None
            if d is None:
                magnitude = update_magnitude(
                    slot.exp_avg, slot.exp_avg_sq, slot.coefficients, self.scratch(slot.param)
                )
            self._merge_one_(group, slot, trims[i], d, magnitude, tau_weight, update_weight)
            updates[i] = None  # free as we go: the peak stays near one update

    def _merge_across_ranks_(
        self, group, slots, updates, trims, layout: FlatLayout, tau_weight, update_weight
    ) -> None:
        """The same merge for the pieces of a partition some of whose tensors span ranks. The
        pieces of those tensors first: their |D| side by side in one buffer, the exact per-tensor
        thresholds and L1 sums across ranks (every rank makes the same collective calls, with
        whatever pieces it holds), then their merge. The other pieces then one by one, exactly
        as unsharded tensors."""
        ks = {}
        for t, numel in enumerate(layout.numels):
            k = _kept_count(group, numel)
            if layout.shared[t] and k is not None:
                ks[t] = k
        shared = [i for i, slot in enumerate(slots) if slot.tensor in ks]
        magnitudes: dict[int, Tensor] = {}
        if shared:
            like = slots[shared[0]].param
            total = sum(slots[i].param.numel() for i in shared)
            buffer = self.scratch_of(total, like.dtype, like.device)
            offset = 0
            for i in shared:
                slot = slots[i]
                region = buffer[offset : offset + slot.param.numel()]
                offset += region.numel()
                if updates[i] is not None:
                    magnitudes[i] = torch.abs(flat(updates[i]), out=region)
                else:
                    magnitudes[i] = update_magnitude(
                        slot.exp_avg, slot.exp_avg_sq, slot.coefficients, region
                    )
        thresholds = kth_largest(layout, ks, {slots[i].tensor: magnitudes[i] for i in shared})
        selections = {}
        for i in shared:
            threshold = thresholds[slots[i].tensor]
            selections[i] = [torch.nonzero(magnitudes[i] >= threshold).squeeze(1), threshold, 1.0]
        if group["rescale"] and ks:
            local_sums = torch.tensor(
                [[magnitudes[i].sum(dtype=torch.float64).item(),
                  magnitudes[i].index_select(0, selections[i][0]).sum(dtype=torch.float64).item()]
                 for i in shared],
                dtype=torch.float64,
            ).reshape(-1, 2)
            totals = tensor_sums(layout, [slots[i].tensor for i in shared], local_sums).tolist()
            for i, (full_l1, kept_l1) in zip(shared, totals):
                c = slots[i].coefficients
                unit = 1.0 if updates[i] is not None else abs(c.step_size * c.bc2_sqrt)
                if full_l1 * unit >= 1e-8:
                    selections[i][2] = full_l1 / kept_l1
        for i in shared:
            d = flat(updates[i]) if updates[i] is not None else None
            self._merge_one_(group, slots[i], trims[i], d, magnitudes[i], tau_weight,
                             update_weight, selections[i])
            updates[i] = None
        rest = [i for i in range(len(slots)) if i not in selections]
        self._merge_each_(group, slots, updates, trims, rest, tau_weight, update_weight)

    def _select(self, group: dict, slot: MergeSlot, k: int | None, d, magnitude) -> list:
        """[kept positions, threshold, scale] of the top-k trim of one whole tensor."""
        if k is None:
            return [None, None, 1.0]
        kept, threshold = topk_positions(magnitude, k)
        scale = 1.0
        if group["rescale"]:
            c = slot.coefficients
            unit = 1.0 if d is not None else abs(c.step_size * c.bc2_sqrt)  # |D| = unit * magnitude
            full_l1 = magnitude.sum(dtype=torch.float64)
            if full_l1.item() * unit >= 1e-8:
                kept_l1 = magnitude.index_select(0, kept).sum(dtype=torch.float64)
                scale = (full_l1 / kept_l1).item()
        return [kept, threshold, scale]

    def _merge_one_(
        self,
        group: dict,
        slot: MergeSlot,
        k: int | None,
        d: Tensor | None,
        magnitude: Tensor | None,
        tau_weight: float,
        update_weight: float,
        selection: list | None = None,
    ) -> None:
        """One parameter: d is the dense D, or None and magnitude holds u ~ |D| (D's sign and
        scale recovered from exp_avg where needed, see adamw_math.update_magnitude).
        selection: [kept, threshold, scale] when already found across ranks."""
        p = flat(slot.param)
        if d is not None:
            values_at = lambda index: d.index_select(0, index)  # noqa: E731
            if k is not None and magnitude is None:
                magnitude = torch.abs(d, out=self.scratch(d))
        else:
            values_at = lambda index: signed_at(  # noqa: E731
                magnitude, slot.exp_avg, index, slot.coefficients
            )
        if selection is None:
            selection = self._select(group, slot, k, d, magnitude)
        kept, threshold, scale = selection

        def trimmed_at(index: Tensor) -> Tensor:
            """D_k at flat positions `index`: D where |D| >= threshold, rescaled, else 0."""
            values = values_at(index)
            if threshold is not None:
                values.mul_(magnitude.index_select(0, index) >= threshold)
            return values.mul_(scale) if scale != 1.0 else values

        if slot.tau is not None:
            # Dense tau: form D_k densely (in a buffer we own) and elect everywhere.
            if kept is not None:
                values = trimmed_at(kept)
                d = (d if d is not None else magnitude).zero_().index_copy_(0, kept, values)
            tau = flat(slot.tau).to(d.dtype)
            self._elect_and_apply_(group, p, tau, d, tau_weight, update_weight, dense=True)
            return
        # Sparse tau: apply all of D_k, then correct at tau's positions.
        index = slot.tau_index
        at_tau = trimmed_at(index) if index.numel() else None
        if kept is None:
            p.add_(d, alpha=update_weight)
        else:
            p.index_add_(0, kept, trimmed_at(kept), alpha=update_weight)
        if at_tau is not None:
            tau = slot.tau_value.to(at_tau.dtype)
            self._elect_and_apply_(group, p, tau, at_tau, tau_weight, update_weight, index=index)

    @staticmethod
    def _elect_and_apply_(
        group, p, tau, update, tau_weight, update_weight, dense=False, index=None
    ) -> None:
        """Sign election: s = +1 where (tau + D_k) >= 0 else -1; drop entries of sign != s.

        dense: p += tau_weight*tau_s + update_weight*D_s. Sparse (index given): D_k was already
        added in full, so add tau_weight*tau_s - update_weight*(D_k - D_s) at `index`.
        """
        if group["weighted_election"]:
            total = torch.add(update * (1.0 - group["alpha"]), tau, alpha=group["alpha"])
        else:
            total = torch.add(tau, update)
        positive = total >= 0
        del total
        update_agrees = torch.eq(update > 0, positive)
        if dense:
            p.add_(update.mul_(update_agrees), alpha=update_weight)
            if tau_weight != 0.0:
                p.add_(tau * torch.eq(tau > 0, positive), alpha=tau_weight)
            return
        correction = update.mul_(update_agrees.logical_not_()).mul_(-update_weight)
        if tau_weight != 0.0:
            correction.add_(tau * torch.eq(tau > 0, positive), alpha=tau_weight)
        p.index_add_(0, index, correction)


OPTIMIZER = OptimizerSpec(
    "onties", OnTIESAdamW, "online TIES: the top q of the update by magnitude, signs elected with tau",
    hyperparameters=MERGING_HYPERPARAMETERS + (
        Param("weighted_election", False, bool,
              "elect signs on alpha*tau + (1 - alpha)*D_k (the paper) instead of tau + D_k (the authors' code)"),
    ),
    merging=True,
)
