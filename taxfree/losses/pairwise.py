"""Plain pairwise preference losses (DPO, IPO, hinge) as pure functions, docs/algorithms.md 2.

The align stage runs these methods through TRL's DPOTrainer; these functions are for users who
want the same maths in their own loop, and for checking TRL against the specification.
Inputs are per-pair log-ratios z_w (chosen) and z_l (rejected); results are means over pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from taxfree.errors import TaxfreeError
from taxfree.losses._checks import check_positive, check_same_1d
from taxfree.losses.contrastive import PREF_EPS
from taxfree.losses.methods import BETA, TRL_DPO, AlignMethod
from taxfree.params import Param


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


LABEL_SMOOTHING = Param("label_smoothing", 0.0, float, "dpo: probability that a label is flipped (conservative DPO)",
                        within="[0, 0.5)")

# Trained by TRL's DPOTrainer under its loss names; the functions above are the same maths.
METHODS = (
    AlignMethod("dpo", "DPO: -log sigmoid(beta*(z_w - z_l))", TRL_DPO, params=(BETA, LABEL_SMOOTHING),
                loss_type="sigmoid", trainer_args={"beta": "beta", "label_smoothing": "label_smoothing"},
                paper="arXiv 2305.18290"),
    AlignMethod("ipo", "IPO: (z_w/len_w - z_l/len_l - 1/(2*beta))^2", TRL_DPO, params=(BETA,), loss_type="ipo",
                trainer_args={"beta": "beta"}, paper="arXiv 2310.12036"),
    AlignMethod("hinge", "hinge: relu(1 - beta*(z_w - z_l))", TRL_DPO, params=(BETA,), loss_type="hinge",
                trainer_args={"beta": "beta"}, paper="arXiv 2305.10425"),
    # TRL refuses exo_pair with label_smoothing == 0: the EXO eps goes in as DPOConfig.label_smoothing.
    AlignMethod("exo-pair", "EXO's pairwise loss as TRL has it (exo-pref up to a constant)", TRL_DPO,
                params=(BETA, PREF_EPS), loss_type="exo_pair",
                trainer_args={"beta": "beta", "label_smoothing": "pref_eps"}, paper="arXiv 2402.00856"),
)

