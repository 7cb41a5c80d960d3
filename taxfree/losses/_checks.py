"""Argument checks shared by the loss functions: every mistake is one TaxfreeError line."""

from __future__ import annotations

import torch

from taxfree.errors import TaxfreeError


def check_positive(name: str, value: float, where: str) -> None:
    if not (isinstance(value, (int, float)) and value > 0):
        raise TaxfreeError(f"{where}: {name} must be > 0, got {value!r}")


def check_same_1d(where: str, **tensors: torch.Tensor) -> None:
    """All tensors 1-D with one shared length (one entry per pair)."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if any(len(s) != 1 for s in shapes.values()) or any(s != first for s in shapes.values()):
        listed = ", ".join(f"{n}{list(s)}" for n, s in shapes.items())
        raise TaxfreeError(f"{where}: expected 1-D tensors of one length, got {listed}")
