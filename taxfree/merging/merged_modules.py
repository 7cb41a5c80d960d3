"""Modules that compute with `(1 - a) * W_sft + a * W_aligned` without keeping that merged copy.

AMA trains a few mixing weights `a` while both models stay frozen. Merging every weight once
would cost a third model; saving each merged weight for backward would too. `MergedLinear`
rebuilds its merged weight inside forward and again inside backward (one layer's worth of
temporary memory at a time) and saves only the input activation. The frozen source parameters
are registered in these modules as shared objects, never copied. The weight `a` comes from a
callable, so it is always the live value of the trainable logits, never a stale copy.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

AlignedWeight = Callable[[], "torch.Tensor | float"]


def _as_tensor(a: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.tensor(float(a), device=like.device)


def _merge(w_sft: torch.Tensor, w_aligned: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    a = a.to(w_sft.dtype)
    return w_sft * (1 - a) + w_aligned * a


class MergedLinearFunction(torch.autograd.Function):
    """y = x @ ((1 - a) W_sft + a W_aligned)^T, differentiable in x and a, recomputing W in backward.

    dL/da = <dL/dW, W_aligned - W_sft> with dL/dW = gy^T x (Frobenius inner product, in float32).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, w_sft: torch.Tensor, w_aligned: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, a, w_sft, w_aligned)  # x is an activation; the weights are the frozen params
        return F.linear(x, _merge(w_sft, w_aligned, a))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy: torch.Tensor):
        x, a, w_sft, w_aligned = ctx.saved_tensors
        gx = ga = None
        # (casts are no-ops unless autocast ran the forward matmul in a lower precision)
        if ctx.needs_input_grad[0]:
            gx = (gy.to(w_sft.dtype) @ _merge(w_sft, w_aligned, a)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            gw = gy.reshape(-1, gy.shape[-1]).transpose(0, 1).to(x.dtype) @ x.reshape(-1, x.shape[-1])
            diff = (w_aligned - w_sft).float()
            ga = torch.dot(gw.float().reshape(-1), diff.reshape(-1)).to(a.dtype)
        return gx, ga, None, None


def _share(module: nn.Module, name: str, sft: nn.Module, aligned: nn.Module) -> None:
    """Register the frozen source parameters (shared objects, no copy) as `<name>_sft`, `<name>_aligned`,
    so the merged model reports the right device and dtype and `.to()` reaches them."""
    module.register_parameter(f"{name}_sft", getattr(sft, name))
    module.register_parameter(f"{name}_aligned", getattr(aligned, name))


class MergedLinear(nn.Module):
    """Stand-in for an nn.Linear (or transformers' Conv1D, transposed) of the merged model."""

    def __init__(self, sft: nn.Module, aligned: nn.Module, aligned_weight: AlignedWeight, transposed: bool = False):
        super().__init__()
        _share(self, "weight", sft, aligned)
        self.has_bias = getattr(sft, "bias", None) is not None
        if self.has_bias:
            _share(self, "bias", sft, aligned)
        self._aligned_weight = aligned_weight
        self.transposed = transposed  # Conv1D stores (in, out) and computes x @ W + b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_sft, w_aligned = self.weight_sft, self.weight_aligned
        if self.transposed:
            w_sft, w_aligned = w_sft.t(), w_aligned.t()
        a = _as_tensor(self._aligned_weight(), w_sft)
        y = MergedLinearFunction.apply(x, a, w_sft, w_aligned)
        if self.has_bias:
            y = y + _merge(self.bias_sft, self.bias_aligned, a)
        return y


class MergedEmbedding(nn.Module):
    """Stand-in for an nn.Embedding: a lookup is linear in the table, so mix two lookups instead
    of building the merged table."""

    def __init__(self, sft: nn.Embedding, aligned: nn.Embedding, aligned_weight: AlignedWeight):
        super().__init__()
        _share(self, "weight", sft, aligned)
        self._aligned_weight = aligned_weight
        self.padding_idx = sft.padding_idx

    @property
    def weight(self) -> torch.Tensor:
        """The merged table, built on demand (for code that asks for it; forward never does)."""
        return _merge(self.weight_sft, self.weight_aligned, _as_tensor(self._aligned_weight(), self.weight_sft))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        a = _as_tensor(self._aligned_weight(), self.weight_sft).to(self.weight_sft.dtype)
        return (F.embedding(ids, self.weight_sft, self.padding_idx) * (1 - a)
                + F.embedding(ids, self.weight_aligned, self.padding_idx) * a)


def merge_parameters_on_call(module: nn.Module, sft: nn.Module, aligned: nn.Module, aligned_weight: AlignedWeight) -> None:
    """Any other module (norms, ...): its parameters become merged tensors set before each call.

    These tensors are small (norm scales, biases); they are rebuilt per call so they follow the
    live weight and carry its gradient. The sources stay registered as `<name>_sft/_aligned`.
    """
    names = [n for n, p in module._parameters.items() if p is not None]
    for name in names:
        del module._parameters[name]
        _share(module, name, sft, aligned)

    def set_merged(mod: nn.Module, args) -> None:
        a = aligned_weight()
        for name in names:
            w_sft = mod._parameters[f"{name}_sft"]
            object.__setattr__(mod, name, _merge(w_sft, mod._parameters[f"{name}_aligned"], _as_tensor(a, w_sft)))

    module.register_forward_pre_hook(set_merged)
    with torch.no_grad():
        set_merged(module, ())
