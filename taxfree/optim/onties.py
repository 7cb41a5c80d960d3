"""OnTIES-AdamW: AdamW whose update is trimmed to its top-k entries and sign-elected with tau.

docs/algorithms.md 1.2 and 1.4.

Top-k keeps exactly k = int(q * numel) entries of each tensor, at every step: the entries with
the largest |D|, and among entries tied with the k-th largest |D| the lowest flat positions
first (`sparsify.take_top_k`). The authors keep whatever torch's argsort/topk returns, which is
unspecified for ties; a rule of "every |D| >= the k-th largest" keeps far more than k at Adam's
first step, where |D| = lr*|g|/(|g|+eps) is nearly constant. The selection needs no sort of the
whole tensor (`sparsify.topk_positions`: a sampled lower bound, then an exact selection on about
1.2k candidates).

The election runs densely where tau is dense; with a sparse tau the trimmed update is applied
first and then corrected at tau's q*n positions only, which is the same arithmetic because the
election cannot drop anything where tau is zero.

Under DeepSpeed ZeRO (and FSDP1/FSDP2) a slot may be one rank's piece of a tensor. k is then q
times the whole tensor's size, the k entries of a tensor spread over ranks are found exactly
across them (`sharded.take_top_k_across_ranks`, ties by position in the whole tensor), and the
rescale's L1 norms are summed over the tensor's pieces, so the kept entries and the scale are
those of an unsharded run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from taxfree.optim import cpu_kernel
from taxfree.optim.adamw_math import adam_updates
from taxfree.optim.online_merging import MERGING_HYPERPARAMETERS, MergeSlot, OnlineMergingAdamW, flat
from taxfree.optim.registry import OptimizerSpec
from taxfree.optim.sharded import (
    FlatLayout,
    take_top_k_across_ranks,
    tensor_counts,
    tensor_min,
    tensor_sums,
)
from taxfree.optim.sparsify import (
    candidate_limit,
    lower_bound_from_sample,
    sample_positions,
    sample_size_for,
    take_top_k,
    topk_positions,
)
from taxfree.params import Param


def _kept_count(group: dict, numel: int) -> int | None:
    """k of the top-k trim, or None when nothing is trimmed (q >= 1 or k < 1, as the authors)."""
    q = group["reserve_p"]
    k = int(q * numel)
    return None if q >= 1.0 or k < 1 else k


@dataclass
class Trim:
    """The trimmed (and rescaled) update D_k of one slot: `values` at `kept` (ascending flat
    positions), zero elsewhere."""

    kept: Tensor
    values: Tensor | None = None

    def at(self, index: Tensor) -> Tensor:
        """D_k at the ascending flat positions `index` (zero where not kept)."""
        index = index.long()
        out = torch.zeros(index.numel(), dtype=self.values.dtype, device=self.values.device)
        if self.kept.numel() and index.numel():
            where = torch.searchsorted(self.kept, index).clamp_(max=self.kept.numel() - 1)
            hit = self.kept.index_select(0, where) == index
            out = torch.where(hit, self.values.index_select(0, where), out)
        return out


@dataclass
class Candidates:
    """The entries of one slot whose |D| reaches a bound: ascending positions and D there;
    `complete` False when heavy ties let too many reach it to gather (select densely then)."""

    index: Tensor | None
    values: Tensor | None
    full_l1: float | None
    complete: bool


class _Piece:
    """One slot's |D| for the top-k: a sampled lower bound for the k-th largest, the candidates
    that reach a bound, and the dense |D| when those are too many. On the fused CPU path
    (`slot.grad` set) the sample is read before the moment update (`peek`) and the candidates are
    collected in the update pass itself; on the torch path |D| is formed densely once."""

    def __init__(self, opt: "OnTIESAdamW", slot: MergeSlot, d: Tensor | None, region=None):
        # region: a function giving this piece's room for a dense |D| (default: the scratch)
        self.opt, self.slot, self.d, self.region = opt, slot, d, region
        self.fused = slot.grad is not None
        self.magnitude: Tensor | None = None
        self.expected = slot.param.numel()

    def _buffer(self) -> Tensor:
        return self.region() if self.region is not None else self.opt.scratch(self.slot.param)

    def dense(self) -> Tensor:
        """|D| of every entry (after `collect` on the fused path)."""
        if self.magnitude is None:
            slot = self.slot
            if self.fused:
                self.magnitude = cpu_kernel.kernel().dense_abs(
                    flat(slot.exp_avg), flat(slot.exp_avg_sq), slot.coefficients, self._buffer())
            else:
                self.magnitude = self.opt._magnitude(slot, self.d, self._buffer())
        return self.magnitude

    def values_at(self, index: Tensor) -> Tensor:
        """D at ascending positions (after `collect`)."""
        slot = self.slot
        if self.fused:
            return cpu_kernel.kernel().at(flat(slot.exp_avg), flat(slot.exp_avg_sq), index, slot.coefficients)
        return self.opt._values_at(slot, self.d, self.dense(), index)

    def bound(self, k: int, numel: int) -> float | None:
        """A value at least a fraction k/numel of this piece's entries reach (with overwhelming
        probability); None when the piece is too small to sample."""
        slot = self.slot
        n = slot.param.numel()
        size = sample_size_for(n)
        if not size:
            return None
        index = sample_positions(n, size, slot.param.device)
        if self.fused:
            sample = cpu_kernel.kernel().peek(slot.grad, flat(slot.exp_avg), flat(slot.exp_avg_sq),
                                              index, slot.coefficients)
        else:
            sample = self.dense().index_select(0, index)
        bound, self.expected = lower_bound_from_sample(sample, numel, k)
        self.expected = min(n, -(-self.expected * n // numel))
        return bound

    def collect(self, lower: float, l1: bool) -> Candidates:
        """The entries with |D| >= lower (every entry for lower 0); runs the pending moment
        update on the fused path."""
        slot = self.slot
        limit = candidate_limit(self.expected) if lower > 0 else slot.param.numel()
        if self.fused:
            c = slot.coefficients
            index, values, full_l1, complete = cpu_kernel.kernel().update_collect(
                flat(slot.param) if c.decay != 1.0 else None, slot.grad, flat(slot.exp_avg),
                flat(slot.exp_avg_sq), c, lower, limit, l1=l1,
            )
            slot.grad = None
            return Candidates(index, values, full_l1, complete)
        magnitude = self.dense()
        full_l1 = magnitude.sum(dtype=torch.float64).item() if l1 else None
        if lower <= 0:
            index = torch.arange(magnitude.numel(), device=magnitude.device)
        else:
            reach = magnitude >= lower
            if int(torch.count_nonzero(reach).item()) > limit:
                return Candidates(None, None, full_l1, False)
            index = torch.nonzero(reach).squeeze(1)
        return Candidates(index, self.opt._values_at(slot, self.d, magnitude, index), full_l1, True)


class OnTIESAdamW(OnlineMergingAdamW):
    """Online TIES merging on top of torch.optim.AdamW.

    Args beyond AdamW's: reserve_p (q, fraction of entries kept by magnitude: exactly
    int(q*numel) per tensor, ties by lowest position), alpha (weight of tau), use_merge (add tau
    at all), rescale (L1 rescale after trimming, of tau and of the update), online_step (merge
    every K steps), param_name_map, seed, tau_dtype, sparse_tau, weighted_election (False: elect
    signs on tau + D_k as the authors' code does; True: on alpha*tau + (1-alpha)*D_k as the
    paper's equations). clip_tau is accepted for a uniform signature and not used (the authors'
    OnTIES clamps nothing). Call `init_ref_param_diff(ref, base)` before the first step.
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
        kept = topk_positions(values.abs(), k)
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
        weights = (alpha if use_merge else 0.0, 1.0 - alpha if use_merge else 1.0)
        trims = [_kept_count(group, s.full_numel) for s in slots]
        across = set()
        if layout is not None and layout.any_shared:
            across = {i for i, s in enumerate(slots) if trims[i] is not None and layout.shared[s.tensor]}
        given = updates is not None  # online_step > 1: the dense D (with the cached sum) is given
        dense: list[Tensor | None] = list(updates) if given else [None] * len(slots)
        if not given:  # D where nothing is trimmed: the fused pass's, else AdamW's exact one
            untrimmed = [i for i, k in enumerate(trims) if k is None]
            for i in [i for i in untrimmed if slots[i].grad is not None]:
                dense[i] = torch.empty_like(flat(slots[i].param))
                self.moments_(slots[i], d_out=dense[i])
            untrimmed = [i for i in untrimmed if dense[i] is None]
            exact = adam_updates(
                [slots[i].exp_avg for i in untrimmed], [slots[i].exp_avg_sq for i in untrimmed],
                [slots[i].coefficients for i in untrimmed],
            )
            for i, d in zip(untrimmed, exact):
                dense[i] = d
        selected: dict[int, Trim] = {}
        if layout is not None and layout.any_shared:
            selected = self._trim_across_ranks(group, slots, dense, across, layout)
        for i, slot in enumerate(slots):
            if trims[i] is not None and i not in across:
                selected[i] = self._trim_one(group, slot, trims[i], dense[i])
            self._merge_one_(group, slot, dense[i], selected.pop(i, None), weights)
            dense[i] = None  # free as we go: the peak stays near one update

    # ----- the trim ------------------------------------------------------------------------

    def _magnitude(self, slot: MergeSlot, d: Tensor | None, out: Tensor) -> Tensor:
        """|D| of the slot into `out` (flat): of the given dense D, else of AdamW's exact D
        (the same operations as `adam_updates`, one tensor at a time)."""
        if d is None:
            c = slot.coefficients
            torch.sqrt(slot.exp_avg_sq.reshape(-1), out=out)
            out.div_(c.bc2_sqrt).add_(c.eps)
            torch.div(slot.exp_avg.reshape(-1).mul(c.step_size), out, out=out)
            return out.abs_()
        return torch.abs(flat(d), out=out)

    @staticmethod
    def _values_at(slot: MergeSlot, d: Tensor | None, magnitude: Tensor, kept: Tensor) -> Tensor:
        """D at `kept`: from the given dense D, else |D| with D's sign (that of step_size * m)."""
        if d is not None:
            return flat(d).index_select(0, kept)
        values = magnitude.index_select(0, kept)
        sign = slot.exp_avg.reshape(-1).index_select(0, kept).mul_(slot.coefficients.step_size)
        return values.copysign_(sign)

    def _trim_one(self, group: dict, slot: MergeSlot, k: int, d: Tensor | None) -> Trim:
        """Top-k of a whole tensor (or of a piece no other rank shares)."""
        piece = _Piece(self, slot, d, None)
        lower = piece.bound(k, slot.full_numel)
        found = piece.collect(0.0 if lower is None else lower, group["rescale"])
        if found.complete and found.index.numel() >= k:
            chosen = take_top_k(found.values.abs(), k)
            kept, values = found.index.index_select(0, chosen), found.values.index_select(0, chosen)
        else:  # the bound was too high, or heavy ties: select on the dense |D|
            kept = take_top_k(piece.dense(), k)
            values = piece.values_at(kept)
        if found.full_l1 is not None and found.full_l1 >= 1e-8:
            values.mul_(found.full_l1 / values.abs().sum(dtype=torch.float64).item())
        return Trim(kept, values)

    def _trim_across_ranks(
        self, group: dict, slots: list[MergeSlot], dense: list, across: set[int], layout: FlatLayout
    ) -> dict[int, Trim]:
        """The trims of the pieces of tensors that span ranks, with the same collective calls on
        every rank whatever pieces it holds (none, under FSDP1, is possible): each piece's
        sampled lower bound, the smallest over the ranks (so the union of the candidates holds
        every entry of the top k), the candidates and their total (a tensor short of k, or
        with too many candidates on some rank, selects on its dense |D| on every rank), the
        exact top-k across ranks, and the L1 sums of the rescale."""
        ks = {}
        for t, numel in enumerate(layout.numels):
            k = _kept_count(group, numel)
            if layout.shared[t] and k is not None:
                ks[t] = k
        if not ks:
            return {}
        shared = sorted(across)
        tensors = list(ks)
        pieces, offset = {}, 0
        if shared:  # room for the dense |D| of every shared piece, side by side, when needed
            like = slots[shared[0]].param
            total = sum(slots[i].param.numel() for i in shared)

            def region(start: int, n: int) -> Tensor:
                return self.scratch_of(total, like.dtype, like.device)[start : start + n]

        for i in shared:
            n = slots[i].param.numel()
            pieces[i] = _Piece(self, slots[i], dense[i], lambda a=offset, n=n: region(a, n))
            offset += n
        bounds = {}
        for i in shared:
            t = slots[i].tensor
            bound = pieces[i].bound(ks[t], layout.numels[t])
            bounds[t] = float("inf") if bound is None else bound
        lowers = tensor_min(layout, bounds, tensors)
        found = {}
        for i in shared:
            lower = lowers[slots[i].tensor]
            found[i] = pieces[i].collect(0.0 if lower == float("inf") else lower, group["rescale"])
        unusable = 1 << 40  # a piece with too many candidates to gather
        totals = tensor_counts(
            layout, {slots[i].tensor: found[i].index.numel() if found[i].complete else unusable for i in shared},
            tensors,
        )
        dense_select = {t for t in tensors if not ks[t] <= totals[t] < unusable}
        values = {}
        for i in shared:
            t = slots[i].tensor
            values[t] = pieces[i].dense() if t in dense_select else found[i].values.abs()
        segments = {s.tensor: s for s in layout.segments}
        kept = take_top_k_across_ranks(
            layout, ks, values, {slots[i].tensor: segments[slots[i].tensor].offset for i in shared}
        )
        trims = {}
        for i in shared:
            t, chosen = slots[i].tensor, kept[slots[i].tensor]
            if t in dense_select:
                trims[i] = Trim(chosen, pieces[i].values_at(chosen))
            else:
                trims[i] = Trim(found[i].index.index_select(0, chosen), found[i].values.index_select(0, chosen))
        if group["rescale"]:
            local_sums = torch.tensor(
                [[found[i].full_l1, trims[i].values.abs().sum(dtype=torch.float64).item()] for i in shared],
                dtype=torch.float64,
            ).reshape(-1, 2)
            totals_l1 = tensor_sums(layout, [slots[i].tensor for i in shared], local_sums).tolist()
            for i, (full_l1, kept_l1) in zip(shared, totals_l1):
                if full_l1 >= 1e-8:
                    trims[i].values.mul_(full_l1 / kept_l1)
        return trims

    # ----- the merge -----------------------------------------------------------------------

    def _merge_one_(
        self, group: dict, slot: MergeSlot, d: Tensor | None, trim: Trim | None, weights
    ) -> None:
        """One parameter: D_k is `trim` where trimmed, else the dense D `d`."""
        tau_weight, update_weight = weights
        p = flat(slot.param)
        d = flat(d) if d is not None else None
        if slot.tau is not None:
            # Dense tau: form D_k densely (in a buffer we own) and elect everywhere.
            if trim is not None:
                d = self.scratch(slot.param).zero_().index_copy_(0, trim.kept, trim.values)
            tau = flat(slot.tau).to(d.dtype)
            self._elect_and_apply_(group, p, tau, d, tau_weight, update_weight, dense=True)
            return
        # Sparse tau: apply all of D_k, then correct at tau's positions.
        index = slot.tau_index
        if trim is None:
            at_tau = d.index_select(0, index) if index.numel() else None
            p.add_(d, alpha=update_weight)
        elif self._kernel_applies(p, trim, slot):
            cpu_kernel.kernel().ties_apply(p, trim.kept, trim.values, index, slot.tau_value,
                                           update_weight, tau_weight, group["weighted_election"],
                                           group["alpha"])
            return
        else:
            at_tau = trim.at(index) if index.numel() else None
            p.index_add_(0, trim.kept, trim.values, alpha=update_weight)
        if at_tau is not None:
            tau = slot.tau_value.to(at_tau.dtype)
            self._elect_and_apply_(group, p, tau, at_tau, tau_weight, update_weight, index=index)

    @staticmethod
    def _kernel_applies(p: Tensor, trim: Trim, slot: MergeSlot) -> bool:
        """The election at the union of kept and tau positions in one C walk (fp32 CPU)."""
        return (cpu_kernel.kernel() is not None and cpu_kernel.usable(p, trim.values, slot.tau_value)
                and slot.tau_index.dtype == torch.int32 and slot.tau_index.is_contiguous()
                and trim.kept.is_contiguous())

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
