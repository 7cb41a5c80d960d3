"""The weight each model gets on each tensor, decided before any tensor is read.

Convention (docs/algorithms.md 3): a two-model merge is `(1 - w) * sft + w * aligned` with `w` the
*aligned weight*. Partwise merging gives each contiguous block of decoder layers its own
aligned weight, and the embeddings and the final norm + LM head their own explicit ones.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from taxfree.errors import TaxfreeError
from taxfree.merging.layers import classify, count_layers

_OUTPUT_EMBEDDING_NAMES = ("lm_head.weight", "embed_out.weight", "output.weight")


@dataclass(frozen=True)
class LayerRangeWeight:
    """Aligned weight for decoder layers first..last (inclusive; last None = to the end)."""

    first: int
    last: int | None
    aligned_weight: float

    def label(self) -> str:
        return f"{self.first}-{'' if self.last is None else self.last}"


def parse_blocks(text: str) -> list[LayerRangeWeight]:
    """'0-10:0.4,11-20:0.3,21-:0.2' -> ranges; 'N:w' is the single layer N."""
    ranges = []
    for item in (s.strip() for s in text.split(",")):
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d*))?\s*:\s*([-+0-9.eE]+)", item)
        if not match:
            raise TaxfreeError(f"--blocks: cannot read {item!r} (expected FIRST-LAST:WEIGHT, e.g. 0-10:0.4 or 21-:0.2)")
        first = int(match.group(1))
        if match.group(2) is None:
            last: int | None = first
        else:
            last = int(match.group(2)) if match.group(2) else None
        try:
            weight = float(match.group(3))
        except ValueError:
            raise TaxfreeError(f"--blocks: {item!r}: weight {match.group(3)!r} is not a number") from None
        if last is not None and last < first:
            raise TaxfreeError(f"--blocks: {item!r}: last layer {last} is before first layer {first}")
        ranges.append(LayerRangeWeight(first, last, weight))
    return ranges


def check_weight(what: str, value: float, allow_extrapolation: bool) -> float:
    if not math.isfinite(value):
        raise TaxfreeError(f"{what} must be a finite number, got {value}")
    if not allow_extrapolation and not 0.0 <= value <= 1.0:
        raise TaxfreeError(f"{what} = {value} is outside [0, 1] (pass --allow-extrapolation to allow it)")
    return value


def linear_weights(weights: Sequence[float], normalize: bool = False, allow_extrapolation: bool = False) -> list[float]:
    """One weight per model; they must sum to 1 unless `normalize` divides them by their sum."""
    if len(weights) < 2:
        raise TaxfreeError(f"a merge needs at least 2 models, got {len(weights)}")
    weights = [float(w) for w in weights]
    for i, w in enumerate(weights):
        if not math.isfinite(w):
            raise TaxfreeError(f"weight of model {i + 1} must be a finite number, got {w}")
    total = sum(weights)
    if normalize:
        if abs(total) < 1e-12:
            raise TaxfreeError("--normalize: the weights sum to 0")
        weights = [w / total for w in weights]
    elif abs(total - 1.0) > 1e-6:
        raise TaxfreeError(f"model weights sum to {total:g}, not 1 (pass --normalize to divide them by their sum)")
    for i, w in enumerate(weights):
        check_weight(f"weight of model {i + 1}", w, allow_extrapolation)
    return weights


@dataclass(frozen=True)
class PartwiseWeights:
    """Aligned weights by part: `aligned_weight` is the default for every part not given below.

    `blocks` set decoder-layer ranges; `embed_weight` the embeddings; `head_weight` the final
    norm and the LM head. With tied embeddings the one shared matrix is the input embedding and
    takes `embed_weight` (so the merged model stays tied); `head_weight` then covers the final
    norm and any head bias.
    """

    aligned_weight: float | None = None
    blocks: tuple[LayerRangeWeight, ...] = field(default_factory=tuple)
    embed_weight: float | None = None
    head_weight: float | None = None

    def validate(self, allow_extrapolation: bool = False) -> None:
        if self.aligned_weight is None and not self.blocks:
            raise TaxfreeError("give --aligned-weight (and optionally --blocks)")
        for what, value in (("--aligned-weight", self.aligned_weight), ("--embed-weight", self.embed_weight),
                            ("--head-weight", self.head_weight)):
            if value is not None:
                check_weight(what, value, allow_extrapolation)
        for block in self.blocks:
            check_weight(f"--blocks {block.label()} weight", block.aligned_weight, allow_extrapolation)
        if self.aligned_weight is None:
            for what, value in (("--embed-weight", self.embed_weight), ("--head-weight", self.head_weight)):
                if value is None:
                    raise TaxfreeError(f"{what} is required with --blocks when --aligned-weight is not given")

    def layer_weights(self, num_layers: int) -> list[float]:
        """Aligned weight of every decoder layer; blocks must not overlap or leave the model."""
        weights: list[float | None] = [self.aligned_weight] * num_layers
        owner: dict[int, LayerRangeWeight] = {}
        for block in self.blocks:
            last = num_layers - 1 if block.last is None else block.last
            if block.first >= num_layers or last >= num_layers:
                raise TaxfreeError(f"--blocks {block.label()}: the model has layers 0-{num_layers - 1} only")
            for layer in range(block.first, last + 1):
                if layer in owner:
                    raise TaxfreeError(f"--blocks {owner[layer].label()} and {block.label()} both cover layer {layer}")
                owner[layer] = block
                weights[layer] = block.aligned_weight
        uncovered = [i for i, w in enumerate(weights) if w is None]
        if uncovered:
            raise TaxfreeError(f"--blocks leave layer {uncovered[0]} without a weight (cover it or give --aligned-weight)")
        return weights  # type: ignore[return-value]

    def part_weights(self) -> tuple[float, float]:
        embed = self.aligned_weight if self.embed_weight is None else self.embed_weight
        head = self.aligned_weight if self.head_weight is None else self.head_weight
        return embed, head  # type: ignore[return-value]


def is_tied(config: Mapping) -> bool:
    return bool(config.get("tie_word_embeddings", False))


def aligned_weights_by_tensor(
    names: Iterable[str], layer_weights: Sequence[float], embed_weight: float, head_weight: float, tied: bool
) -> dict[str, float]:
    """Aligned weight of every tensor: its layer's, or the embed or head weight.

    When embeddings are tied but a checkpoint still stores the output matrix, that matrix gets
    the embed weight too, so both copies stay equal (transformers would tie them on load anyway).
    """
    out = {}
    for name in names:
        part = classify(name)
        if part.part == "layer":
            out[name] = layer_weights[part.layer]
        elif part.part == "embed" or (tied and name in _OUTPUT_EMBEDDING_NAMES):
            out[name] = embed_weight
        else:
            out[name] = head_weight
    return out


def plan_partwise(names: Sequence[str], partwise: PartwiseWeights, tied: bool) -> tuple[dict[str, float], list[float]]:
    """Aligned weight by tensor, and by layer (for reports)."""
    layers = partwise.layer_weights(count_layers(names))
    embed, head = partwise.part_weights()
    return aligned_weights_by_tensor(names, layers, embed, head, tied), layers
