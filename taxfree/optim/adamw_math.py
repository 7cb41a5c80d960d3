"""torch.optim.AdamW's maths, split so the update D can be merged before it is applied.

The operation order copies torch's foreach AdamW (`_multi_tensor_adam`, decoupled weight
decay): `p *= 1 - lr*wd`; `m.lerp_(g, 1-b1)`; `v = b2*v + (1-b2)*g*g`;
`D = (-lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps)`. With the same rounding steps, adding D to p
gives bit-for-bit what AdamW gives on CPU (docs/algorithms.md 1.5 invariant 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class AdamCoefficients:
    """Per-tensor scalars of one Adam step: D = step_size * m / (sqrt(v)/bc2_sqrt + eps), and
    those of the moment update (m.lerp_(g, w1); v = b2*v + c2*g*g; p *= decay) for the paths
    that run it themselves (taxfree.optim.cpu_kernel)."""

    step_size: float  # -lr / (1 - beta1**t)
    bc2_sqrt: float  # sqrt(1 - beta2**t)
    eps: float
    w1: float = 0.0  # 1 - beta1
    b2: float = 0.0  # beta2
    c2: float = 0.0  # 1 - beta2
    decay: float = 1.0  # 1 - lr * weight_decay


def advance_moments_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> list[AdamCoefficients]:
    """Count the step, apply decoupled decay to the params and update both moments in place.

    Returns the coefficients to form D for each tensor. All tensors of one call should share
    device and dtype (foreach ops take the fast path then).
    """
    if not params:
        return []
    coefficients = count_steps_(steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                weight_decay=weight_decay)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    return coefficients


def count_steps_(
    steps: list[Tensor], *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float
) -> list[AdamCoefficients]:
    """Count the step of every tensor and return its coefficients (moments untouched)."""
    if not steps:
        return []
    torch._foreach_add_(steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
    coefficients = []
    for step in steps:
        t = step.item()
        bias_correction1 = 1 - beta1**t
        bias_correction2 = 1 - beta2**t
        coefficients.append(AdamCoefficients(
            (lr / bias_correction1) * -1, bias_correction2**0.5, eps,
            w1=1 - beta1, b2=beta2, c2=1 - beta2, decay=1 - lr * weight_decay,
        ))
    return coefficients


def adam_updates(
    exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], coefficients: list[AdamCoefficients]
) -> list[Tensor]:
    """Dense D for every tensor, rounded exactly as AdamW (fresh tensors; moments untouched)."""
    if not exp_avgs:
        return []
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, [c.bc2_sqrt for c in coefficients])
    torch._foreach_add_(denoms, coefficients[0].eps)
    updates = torch._foreach_mul(exp_avgs, [c.step_size for c in coefficients])
    torch._foreach_div_(updates, denoms)
    return updates


def adam_update_at(
    exp_avg: Tensor, exp_avg_sq: Tensor, index: Tensor, coefficients: AdamCoefficients
) -> Tensor:
    """D at the flat positions `index` only: the sparse path never forms the dense update."""
    m = exp_avg.reshape(-1).index_select(0, index)
    v = exp_avg_sq.reshape(-1).index_select(0, index)
    denom = v.sqrt_().div_(coefficients.bc2_sqrt).add_(coefficients.eps)
    return m.mul_(coefficients.step_size).div_(denom)


def update_magnitude(
    exp_avg: Tensor, exp_avg_sq: Tensor, coefficients: AdamCoefficients, out: Tensor
) -> Tensor:
    """u = |m| / (sqrt(v) + eps*bc2_sqrt) into `out`, so |D| = |step_size*bc2_sqrt| * u.

    For the paths that must look at every |D| (top-k, L1 norms): u ranks entries exactly as
    |D| does, costs 4 passes into a reused buffer (no allocation per step), and D itself is
    recovered only where needed (`signed_at`: D's sign is the sign of step_size * m). The
    rounding can differ from AdamW's by an ulp; the exact `adam_updates` serves the paths
    where an optimizer must equal AdamW.
    """
    out = out.view(exp_avg_sq.shape)
    torch.sqrt(exp_avg_sq, out=out)
    out.add_(coefficients.eps * coefficients.bc2_sqrt)
    torch.div(exp_avg, out, out=out)
    return out.abs_().view(-1)


def signed_at(
    magnitude: Tensor, exp_avg: Tensor, index: Tensor, coefficients: AdamCoefficients
) -> Tensor:
    """D at flat positions `index` from u (see `update_magnitudes`)."""
    values = magnitude.index_select(0, index)
    torch.copysign(values, exp_avg.reshape(-1).index_select(0, index), out=values)
    return values.mul_(coefficients.step_size * coefficients.bc2_sqrt)
