"""Plain pairwise preference losses (DPO, IPO, hinge) as pure functions, ALGORITHMS.md 2.

The align stage runs these methods through TRL's DPOTrainer; these functions are for users who
want the same maths in their own loop, and for checking TRL against the specification.
Inputs are per-pair log-ratios z_w (chosen) and z_l (rejected); results are means over pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from taxfree.errors import TaxfreeError
from taxfree.losses._checks import check_positive, check_same_1d


def dpo_sigmoid_loss(
    z_chosen: torch.Tensor, z_rejected: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0
) -> torch.Tensor:
    """-(1 - ls) log sigmoid(beta*d) - ls log sigmoid(-beta*d), d = z_w - z_l (conservative DPO)."""
    check_positive("beta", beta, "dpo_sigmoid_loss")
    check_same_1d("dpo_sigmoid_loss", z_chosen=z_chosen, z_rejected=z_rejected)
    if not 0.0 <= label_smoothing < 0.5:
        raise TaxfreeError(f"dpo_sigmoid_loss: label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    d = beta * (z_chosen - z_rejected)
    return (-(1 - label_smoothing) * F.logsigmoid(d) - label_smoothing * F.logsigmoid(-d)).mean()


def ipo_loss(
    z_chosen: torch.Tensor,
    z_rejected: torch.Tensor,
    len_chosen: torch.Tensor,
    len_rejected: torch.Tensor,
    beta: float = 0.1,
) -> torch.Tensor:
    """(z_w/len_w - z_l/len_l - 1/(2 beta))^2: IPO on per-token log-ratios, as TRL and the OM runs do."""
    check_positive("beta", beta, "ipo_loss")
    check_same_1d(
        "ipo_loss", z_chosen=z_chosen, z_rejected=z_rejected, len_chosen=len_chosen, len_rejected=len_rejected
    )
    if bool((len_chosen <= 0).any() or (len_rejected <= 0).any()):
        raise TaxfreeError("ipo_loss: completion lengths must be >= 1 token")
    delta = z_chosen / len_chosen - z_rejected / len_rejected
    return ((delta - 1 / (2 * beta)) ** 2).mean()


def hinge_loss(z_chosen: torch.Tensor, z_rejected: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """relu(1 - beta*(z_w - z_l)) (SLiC-style hinge on the DPO margin)."""
    check_positive("beta", beta, "hinge_loss")
    check_same_1d("hinge_loss", z_chosen=z_chosen, z_rejected=z_rejected)
    return torch.relu(1 - beta * (z_chosen - z_rejected)).mean()
