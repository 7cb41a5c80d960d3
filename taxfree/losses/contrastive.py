"""K-way contrastive alignment losses of the EXO paper (arXiv 2402.00856), docs/algorithms.md 2.

Each prompt has K completions with log-ratios z_i (policy vs reference, summed over response
tokens) and rewards r_i. The policy's distribution over the K completions is
p = softmax(beta_pi * z); the target is q = softmax(r / beta_r) (`*-rw`) or (1 - eps, eps) for
(winner, loser) (`*-pref`, K = 2). EXO minimises the reverse KL(p || q), DPO-style methods the
forward cross-entropy -sum q log p. Pure functions: no model, no trainer.

Reward ties in the pairwise kinds: a pair whose two rewards are equal carries no preference, so
it adds nothing to the loss (and gets no gradient); the loss stays the mean over all B prompts,
so a batch's loss is still the average of its micro-batches' losses. The EXO authors' code makes
the second completion the winner of a tie (`if r_0 > r_1: first wins, else second`), which
trains a full preference the rewards do not express. The uniform target q = (1/2, 1/2) (what
exo-rw gives equal rewards) would pull the pair's log-ratios together, a gradient the data does
not ask for either, and `taxfree.data.records.rw_to_pref` already turns no tied pair into a
preference pair: all paths follow the same rule.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from taxfree.errors import TaxfreeError
from taxfree.losses._checks import check_positive
from taxfree.losses.methods import SAMPLES, TAXFREE_CONTRASTIVE, AlignMethod
from taxfree.params import Param

CONTRASTIVE_KINDS = ("exo-rw", "exo-pref", "dpo-rw", "dpo-pref")

# The EXO authors' code used log q = (0, -10) for (winner, loser): eps = e^-10 / (1 + e^-10).
EXO_PREF_EPS = 1.0 / (1.0 + math.exp(10.0))


def winner_loser(values: torch.Tensor, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split [B, 2] `values` into (winner, loser) columns; the winner has the larger reward.

    Where the rewards tie the split is (first, second), and the pair carries no preference
    (`has_preference`): the losses here give it weight 0 (see the module docstring).
    """
    if values.dim() != 2 or values.shape[1] != 2 or rewards.shape != values.shape:
        raise TaxfreeError(
            f"pairwise split needs [B, 2] values and rewards, got {tuple(values.shape)} "
            f"and {tuple(rewards.shape)}"
        )
    win = rewards.argmax(dim=1, keepdim=True)
    return values.gather(1, win).squeeze(1), values.gather(1, 1 - win).squeeze(1)


def has_preference(rewards: torch.Tensor) -> torch.Tensor:
    """[B] bool: the [B, 2] pair's rewards differ (a tie carries no preference)."""
    return rewards[:, 0] != rewards[:, 1]


def mean_over_prompts(per_pair: torch.Tensor, preferred: torch.Tensor) -> torch.Tensor:
    """Mean over all B prompts of the per-pair losses, tied pairs counting 0 (no gradient)."""
    return torch.where(preferred, per_pair, torch.zeros_like(per_pair)).sum() / per_pair.numel()


def contrastive_loss(
    kind: str,
    logratios: torch.Tensor,
    rewards: torch.Tensor,
    beta_pi: float = 0.1,
    beta_r: float = 0.1,
    pref_eps: float = EXO_PREF_EPS,
) -> torch.Tensor:
    """Mean over prompts of the `kind` loss for `[B, K]` log-ratios and rewards.

    - exo-rw:   sum_i p_i (log p_i - log q_i),  q = softmax(r / beta_r)
    - exo-pref: same reverse KL with q = (1 - pref_eps, pref_eps) for (winner, loser); K = 2
    - dpo-rw:   -sum_i q_i log p_i,             q = softmax(r / beta_r)
    - dpo-pref: -log sigmoid(beta_pi * (z_w - z_l)); K = 2
    where p = softmax(beta_pi * z). Rewards carry no gradient. In the -pref kinds a pair with
    equal rewards counts 0 (the mean is still over all B prompts).
    """
    where = "contrastive_loss"
    if kind not in CONTRASTIVE_KINDS:
        raise TaxfreeError(f"{where}: unknown kind {kind!r}; expected one of {', '.join(CONTRASTIVE_KINDS)}")
    if logratios.dim() != 2 or rewards.shape != logratios.shape:
        raise TaxfreeError(
            f"{where}: logratios and rewards must both be [B, K]; got {tuple(logratios.shape)} "
            f"and {tuple(rewards.shape)}"
        )
    check_positive("beta_pi", beta_pi, where)
    check_positive("beta_r", beta_r, where)
    k = logratios.shape[1]
    if k < 2:
        raise TaxfreeError(f"{where}: need K >= 2 completions per prompt, got K = {k}")
    rewards = rewards.detach().to(logratios.dtype)

    if kind.endswith("-pref"):
        if k != 2:
            raise TaxfreeError(f"{where}: {kind} compares a pair, so K must be 2; got K = {k}")
        if not 0.0 < pref_eps < 0.5:
            raise TaxfreeError(f"{where}: pref_eps must be in (0, 0.5), got {pref_eps!r}")
        z_w, z_l = winner_loser(logratios, rewards)
        preferred = has_preference(rewards)
        if kind == "dpo-pref":
            return mean_over_prompts(-F.logsigmoid(beta_pi * (z_w - z_l)), preferred)
        logratios = torch.stack([z_w, z_l], dim=1)
        log_q = logratios.new_tensor([math.log1p(-pref_eps), math.log(pref_eps)]).expand_as(logratios)
    else:
        preferred = None
        log_q = F.log_softmax(rewards / beta_r, dim=1)

    log_p = F.log_softmax(beta_pi * logratios, dim=1)
    if kind.startswith("exo"):
        per_prompt = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    else:
        per_prompt = -(log_q.exp() * log_p).sum(dim=1)
    return per_prompt.mean() if preferred is None else mean_over_prompts(per_prompt, preferred)


BETA_PI = Param("beta_pi", 0.1, float, "policy scale of the K-way methods: p = softmax(beta_pi * z)", within="> 0")
BETA_R = Param("beta_r", 0.1, float, "reward temperature of the *-rw methods: q = softmax(r / beta_r)", within="> 0")
PREF_EPS = Param("pref_eps", 4.54e-5, float, "target mass on the loser of exo-pref / exo-pair", within="(0, 0.5)")


def _kind(kind: str):
    def loss(logratios, rewards, **settings):
        return contrastive_loss(kind, logratios, rewards, **settings)

    loss.__name__ = f"contrastive_loss_{kind.replace('-', '_')}"
    return loss


_EXO = "arXiv 2402.00856"
METHODS = (
    AlignMethod("exo-pref", "EXO, reverse KL to the (1 - eps, eps) target of a pair", TAXFREE_CONTRASTIVE,
                params=(BETA_PI, PREF_EPS), loss=_kind("exo-pref"), reward_scale="beta_pi", paper=_EXO),
    AlignMethod("exo-rw", "EXO, reverse KL to softmax(r / beta_r) over K scored samples", TAXFREE_CONTRASTIVE,
                data=SAMPLES, params=(BETA_PI, BETA_R), loss=_kind("exo-rw"), reward_scale="beta_pi", paper=_EXO),
    AlignMethod("dpo-rw", "DPO-rw, cross-entropy to softmax(r / beta_r) over K scored samples", TAXFREE_CONTRASTIVE,
                data=SAMPLES, params=(BETA_PI, BETA_R), loss=_kind("dpo-rw"), reward_scale="beta_pi", paper=_EXO),
    AlignMethod("dpo-pref", "DPO with beta = beta_pi on our trainer (EXO's baseline)", TAXFREE_CONTRASTIVE,
                params=(BETA_PI,), loss=_kind("dpo-pref"), reward_scale="beta_pi", paper=_EXO),
)

