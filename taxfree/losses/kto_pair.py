"""Paired KTO (the online merging paper's Table 3 "KTO-pair"), docs/algorithms.md 2.

KTO compares each response's log-ratio with a reference point, an estimate of the policy/ref KL.
With pairs, the chosen side is compared with the rejected side's KL estimate and vice versa.
"""

from __future__ import annotations

import torch

from taxfree.losses._checks import check_positive, check_same_1d
from taxfree.losses.contrastive import has_preference, winner_loser
from taxfree.losses.methods import BETA, TAXFREE_CONTRASTIVE, TRL_KTO, AlignMethod


def kto_pair_kl_estimates(z_chosen: torch.Tensor, z_rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached batch means of the log-ratios, clamped at 0: (KL_chosen, KL_rejected)."""
    return z_chosen.detach().mean().clamp(min=0), z_rejected.detach().mean().clamp(min=0)


def kto_pair_loss(z_chosen: torch.Tensor, z_rejected: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """Mean over the 2B terms 1 - sigmoid(beta*(z_w - KL_l)) and 1 - sigmoid(beta*(KL_w - z_l))."""
    check_positive("beta", beta, "kto_pair_loss")
    check_same_1d("kto_pair_loss", z_chosen=z_chosen, z_rejected=z_rejected)
    kl_chosen, kl_rejected = kto_pair_kl_estimates(z_chosen, z_rejected)
    chosen_terms = 1 - torch.sigmoid(beta * (z_chosen - kl_rejected))
    rejected_terms = 1 - torch.sigmoid(beta * (kl_chosen - z_rejected))
    return torch.cat([chosen_terms, rejected_terms]).mean()


def kto_pair_pair_loss(logratios: torch.Tensor, rewards: torch.Tensor, beta: float = 0.1):
    """kto-pair on [B, 2] log-ratios and rewards (the winner has the larger reward), with the
    two KL reference points as metrics. A pair whose rewards tie carries no preference: it counts
    0 (the loss stays a mean over all B prompts) and is left out of the KL estimates."""
    z_w, z_l = winner_loser(logratios, rewards)
    preferred = has_preference(rewards)
    if not bool(preferred.any()):
        zero = logratios.sum() * 0.0
        return zero, {"kl/chosen": zero.detach(), "kl/rejected": zero.detach()}
    if not bool(preferred.all()):
        z_w, z_l = z_w[preferred], z_l[preferred]
    kl_chosen, kl_rejected = kto_pair_kl_estimates(z_w, z_l)
    loss = kto_pair_loss(z_w, z_l, beta) * (z_w.numel() / preferred.numel())
    return loss, {"kl/chosen": kl_chosen, "kl/rejected": kl_rejected}


METHODS = (
    AlignMethod("kto-pair", "paired KTO: each side against the other side's KL estimate", TAXFREE_CONTRASTIVE,
                params=(BETA,), loss=kto_pair_pair_loss, paper="arXiv 2405.17931 (Table 3)"),
    # Unpaired KTO: every pair becomes a desirable and an undesirable example.
    AlignMethod("kto", "KTO on the pairs taken apart into desirable / undesirable examples", TRL_KTO,
                params=(BETA,), loss_type="kto", trainer_args={"beta": "beta"}, paper="arXiv 2402.01306"),
)

