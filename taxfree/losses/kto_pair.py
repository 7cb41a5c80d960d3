"""Paired KTO (the online merging paper's Table 3 "KTO-pair"), ALGORITHMS.md 2.

KTO compares each response's log-ratio with a reference point, an estimate of the policy/ref KL.
With pairs, the chosen side is compared with the rejected side's KL estimate and vice versa.
"""

from __future__ import annotations

import torch

from taxfree.losses._checks import check_positive, check_same_1d


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
