"""A straightforward per-parameter loop written line by line from docs/algorithms.md 1.1-1.4.

Not for training: it is the oracle the tests compare the fast optimizers with, and the
baseline bench/optimizer_step.py measures them against. Dense masks, dense tau, one parameter
at a time; top-k by a stable sort: exactly k entries, the largest |D| first and among equal |D|
the lowest flat index first (the rule the fast optimizers document).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim import Optimizer


class ReferenceOnlineMergingAdamW(Optimizer):
    """method: "ondare" or "onties"; tau is given per parameter with `set_tau(p, tau)`."""

    def __init__(
        self,
        params,
        method: str,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        reserve_p: float = 1.0,
        alpha: float = 0.0,
        use_merge: bool = False,
        rescale: bool = False,
        online_step: int = 1,
        clip_tau: float = 1.0,
        seed: int = 0,
        tau_dtype: torch.dtype | None = None,
        sparse_tau: bool | None = None,
        weighted_election: bool = False,
    ):
        if method not in ("ondare", "onties"):
            raise ValueError(method)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.method, self.q, self.alpha = method, reserve_p, alpha
        self.use_merge, self.rescale, self.online_step = use_merge, rescale, online_step
        self.clip_tau = clip_tau
        self.tau_dtype = tau_dtype  # tau is rounded through it (storage), the maths stays fp32
        del sparse_tau  # storage only: this oracle keeps tau dense
        self.weighted_election = weighted_election
        self.generator = torch.Generator().manual_seed(seed)

    def set_tau(self, p: Tensor, tau: Tensor) -> None:
        tau = tau.detach().clone()
        if self.tau_dtype is not None:
            tau = tau.to(self.tau_dtype).to(tau.dtype)
        self.state[p]["tau"] = tau

    def _dropout(self, d: Tensor) -> Tensor:
        mask = torch.rand(d.shape, generator=self.generator, device=d.device) < self.q
        return d * mask / self.q

    def _topk(self, d: Tensor) -> Tensor:
        k = int(self.q * d.numel())
        if self.q >= 1 or k < 1:
            return d.clone()
        order = torch.sort(d.abs().flatten(), descending=True, stable=True).indices
        mask = torch.zeros(d.numel(), dtype=torch.bool, device=d.device)
        mask[order[:k]] = True
        kept = d * mask.view_as(d)
        if self.rescale and d.abs().sum() >= 1e-8:
            kept = kept * (d.abs().sum() / kept.abs().sum())
        return kept

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.zeros_like(p)
                    state["cache"] = torch.zeros_like(p)
                state["step"] += 1
                t, g = state["step"], p.grad
                p.mul_(1 - lr * wd)
                state["m"].lerp_(g, 1 - beta1)
                state["v"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = state["v"].sqrt() / (1 - beta2**t) ** 0.5 + eps
                d = (-lr / (1 - beta1**t)) * state["m"] / denom
                if self.online_step > 1:
                    if t % self.online_step != 0:
                        p.add_(d)
                        state["cache"].add_(d)
                        continue
                    p.sub_(state["cache"])
                    d = d + state["cache"]
                    state["cache"].zero_()
                tau = state["tau"]
                if self.method == "ondare":
                    dropped = self._dropout(d) if self.q < 1 else d.clone()
                    if self.rescale and d.abs().sum() >= 1e-8:
                        dropped = dropped * d.abs().sum() / (dropped.abs().sum() + eps)
                        dropped = dropped.clamp(-self.clip_tau, self.clip_tau)
                    if self.use_merge:
                        p.add_(self.alpha * tau + (1 - self.alpha) * dropped)
                    else:
                        p.add_(dropped)
                else:
                    d_k = self._topk(d)
                    total = self.alpha * tau + (1 - self.alpha) * d_k if self.weighted_election else tau + d_k
                    s = torch.where(total >= 0, 1.0, -1.0)
                    tau_s = tau * (torch.sign(tau) == s)
                    d_s = d_k * (torch.sign(d_k) == s)
                    if self.use_merge:
                        p.add_(self.alpha * tau_s + (1 - self.alpha) * d_s)
                    else:
                        p.add_(d_s)
        return None
