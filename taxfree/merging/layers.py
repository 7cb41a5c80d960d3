"""Which part of a decoder a tensor belongs to, from its name alone.

Partwise averaging and AMA weigh three parts differently: the embeddings, each decoder layer,
and the final norm + LM head. Checkpoints name layers in a handful of ways (`model.layers.N`
for Llama/Qwen2/Mistral, `transformer.h.N` for GPT-2/Falcon/BLOOM, `gpt_neox.layers.N`,
`model.decoder.layers.N` for OPT, `transformer.blocks.N` for MPT); all share the shape
`<container>.<index>.` with a small set of container names, which is what is matched here.
"""

from __future__ import annotations

import re
from typing import Iterable, Literal, NamedTuple

from taxfree.errors import TaxfreeError

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)(?:\.|$)")
# Output projections; checked first because GPT-NeoX's `embed_out` also contains "embed".
_HEAD_COMPONENTS = frozenset({"lm_head", "embed_out", "output", "score"})
_EMBED_COMPONENTS = frozenset({"wte", "wpe"})

Part = Literal["embed", "layer", "head"]


class TensorPart(NamedTuple):
    part: Part
    layer: int | None  # decoder layer index for part == "layer"


def layer_index(name: str) -> int | None:
    """Decoder layer index in a tensor or module name, or None outside the layers."""
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else None


def classify(name: str) -> TensorPart:
    """embed / layer N / head for a tensor (or module) name.

    Outside the layers: a name with an output-projection component (lm_head, embed_out, output,
    score) is the head; one with a component containing "embed" (embed_tokens, embed_in,
    word_embeddings, embed_positions, ...) or wte/wpe is an embedding; everything else (the
    final norm: model.norm, transformer.ln_f, gpt_neox.final_layer_norm, ...) goes with the head,
    as it sits after the last layer.
    """
    layer = layer_index(name)
    if layer is not None:
        return TensorPart("layer", layer)
    components = name.split(".")
    if any(c in _HEAD_COMPONENTS for c in components):
        return TensorPart("head", None)
    if any(c in _EMBED_COMPONENTS or "embed" in c for c in components):
        return TensorPart("embed", None)
    return TensorPart("head", None)


def count_layers(names: Iterable[str]) -> int:
    """Number of decoder layers (highest index + 1); every index below it must be present."""
    indices = {i for i in map(layer_index, names) if i is not None}
    if not indices:
        return 0
    missing = sorted(set(range(max(indices) + 1)) - indices)
    if missing:
        raise TaxfreeError(f"decoder layer {missing[0]} has no tensors (layers found: {sorted(indices)[:5]}...)")
    return max(indices) + 1
