"""Adaptive Model Averaging (AMA, arXiv 2309.06256; docs/algorithms.md 4).

One trainable logit `l_b` per block of decoder layers (optionally the LM head as one more
block). The SFT model's weight on block b is

    s_b = s0 * B * (sigmoid(l_b) + eps) / sum_j (sigmoid(l_j) + eps),    a_b = 1 - s_b,

so the mean SFT weight stays s0 and every s_b is at most s0*B*(1+eps)/(1+B*eps). Every tensor
of a layer in block b is `(1 - a_b) * W_sft + a_b * W_aligned`; embeddings and the final norm +
head take fixed aligned weights (or the head block's). The logits are read live at every
forward (the authors' code used a stale copy while training), each is one registered
nn.Parameter (so DDP averages its gradient and an optimizer sees it once), and the merged model
is never materialised: see merged_modules.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from taxfree.atomic import atomic_dir
from taxfree.errors import TaxfreeError
from taxfree.merging.checkpoint import InMemoryCheckpoint
from taxfree.merging.layers import classify, count_layers
from taxfree.merging.merge import DEFAULT_MAX_SHARD_SIZE, check_compatible, write_merged
from taxfree.merging.merged_modules import MergedEmbedding, MergedLinear, merge_parameters_on_call

WEIGHTS_NAME = "ama_weights.json"


def split_layers(num_layers: int, num_blocks: int) -> list[list[int]]:
    """Contiguous blocks whose sizes differ by at most one, the larger ones first (26/3 -> 9, 9, 8)."""
    base, extra = divmod(num_layers, num_blocks)
    blocks, start = [], 0
    for b in range(num_blocks):
        size = base + (1 if b < extra else 0)
        blocks.append(list(range(start, start + size)))
        start += size
    return blocks


def parse_block_spec(spec: str, num_layers: int) -> list[list[int]]:
    """'block3' (default: thirds), 'blockN', or 'layerwise' -> layer indices per block."""
    if spec == "layerwise":
        return split_layers(num_layers, num_layers)
    match = re.fullmatch(r"block(\d+)", spec)
    if not match:
        raise TaxfreeError(f"AMA blocks {spec!r}: expected 'block3', 'blockN' (e.g. 'block4') or 'layerwise'")
    n = int(match.group(1))
    if not 1 <= n <= num_layers:
        raise TaxfreeError(f"AMA blocks {spec!r}: need 1 to {num_layers} blocks for a {num_layers}-layer model")
    return split_layers(num_layers, n)


def layer_regularizer_weight(layer: int, num_layers: int) -> float:
    """w(l) = (L - 1) / (|l - L/2| + 1): largest at the middle layer (layers counted from 0)."""
    return (num_layers - 1) / (abs(layer - num_layers / 2) + 1)


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")  # transformers' GPT-2 layer


class AdaptiveModelAverager(nn.Module):
    """The merged model of AMA, with the per-block mixing logits as its only trainable parameters.

    forward(input_ids, attention_mask=None, labels=None, ...) returns the causal-LM outputs of the
    merged model (its `.loss` is the mean token NLL); add `regularizer()` to get AMA's objective.
    `embed_aligned_weight` / `head_aligned_weight` default to the mean aligned weight 1 - sft_mean.
    """

    def __init__(
        self,
        sft_model: nn.Module,
        aligned_model: nn.Module,
        blocks: str = "block3",
        head_block: bool = False,
        sft_mean: float = 0.2,
        eps: float = 0.2,
        reg: float = 1e-4,
        reg_weighting: str = "plain",
        embed_aligned_weight: float | None = None,
        head_aligned_weight: float | None = None,
    ):
        super().__init__()
        if not 0.0 < sft_mean < 1.0:
            raise TaxfreeError(f"AMA sft_mean must be in (0, 1), got {sft_mean}")
        if eps < 0:
            raise TaxfreeError(f"AMA eps must be >= 0, got {eps}")
        if reg < 0:
            raise TaxfreeError(f"AMA reg must be >= 0, got {reg}")
        if reg_weighting not in ("plain", "layer"):
            raise TaxfreeError(f"AMA reg_weighting must be 'plain' or 'layer', got {reg_weighting!r}")
        for what, value in (("embed_aligned_weight", embed_aligned_weight), ("head_aligned_weight", head_aligned_weight)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise TaxfreeError(f"AMA {what} must be in [0, 1], got {value}")

        sft_params = dict(sft_model.named_parameters(remove_duplicate=False))
        aligned_params = dict(aligned_model.named_parameters(remove_duplicate=False))
        sft_state, aligned_state = InMemoryCheckpoint(sft_params), InMemoryCheckpoint(aligned_params)
        sft_state.config = _config_dict(sft_model)
        aligned_state.config = _config_dict(aligned_model)
        check_compatible([sft_state, aligned_state], ["sft model", "aligned model"])

        self.num_layers = count_layers(sft_params)
        if self.num_layers == 0:
            raise TaxfreeError("AMA: no decoder layers found in the model's parameter names")
        self.block_spec = blocks
        self.block_layers: list[list[int] | str] = list(parse_block_spec(blocks, self.num_layers))
        self.head_block = head_block
        if head_block:
            self.block_layers.append("head")
        self.tied = _shares_output_embedding(sft_model)
        if head_block and self.tied:
            raise TaxfreeError("AMA head_block needs an untied LM head (this model ties it to the input embedding)")
        num_blocks = len(self.block_layers)
        bound = sft_mean * num_blocks * (1 + eps) / (1 + num_blocks * eps)
        if bound > 1.0:
            raise TaxfreeError(f"AMA sft_mean={sft_mean} with {num_blocks} blocks and eps={eps} lets a block's SFT "
                               f"weight reach {bound:.3f} > 1 (lower sft_mean, use fewer blocks or raise eps)")
        self.sft_mean, self.eps, self.reg, self.reg_weighting = sft_mean, eps, reg, reg_weighting
        self.embed_aligned_weight = 1.0 - sft_mean if embed_aligned_weight is None else float(embed_aligned_weight)
        self.head_aligned_weight = 1.0 - sft_mean if head_aligned_weight is None else float(head_aligned_weight)
        self.block_of_layer = {layer: b for b, layers in enumerate(self.block_layers) if layers != "head" for layer in layers}

        self.block_logits = nn.ParameterList([nn.Parameter(torch.zeros(())) for _ in range(num_blocks)])
        for model in (sft_model, aligned_model):
            model.requires_grad_(False)
        self.sft_model, self.aligned_model = sft_model, aligned_model
        self._canonical = {}
        for name, p in sft_model.named_parameters(remove_duplicate=False):
            self._canonical.setdefault(id(p), name)
        self._cached_aligned_weights: torch.Tensor | None = None
        self.merged_model = self._build_merged_model(sft_model, aligned_model)
        self._reg_coefficients = [0.0] * num_blocks  # sum of w(layer) over the Linears of each block
        for block, layer in self._linear_layers:
            self._reg_coefficients[block] += (
                1.0 if reg_weighting == "plain" else layer_regularizer_weight(layer, self.num_layers))
        # DDP: only the logits are synchronised; both frozen models are identical on every rank.
        self._ddp_params_and_buffers_to_ignore = [
            n for n, _ in list(self.named_parameters(remove_duplicate=False)) + list(self.named_buffers(remove_duplicate=False))
            if not n.startswith("block_logits.")
        ]

    # ---- weights ---------------------------------------------------------------------------
    def sft_weights(self) -> torch.Tensor:
        """s_b for every block, from the current logits (differentiable)."""
        shifted = torch.sigmoid(torch.stack(list(self.block_logits))) + self.eps
        return self.sft_mean * len(self.block_logits) * shifted / shifted.sum()

    def aligned_weights(self) -> torch.Tensor:
        """a_b = 1 - s_b for every block (differentiable)."""
        if self._cached_aligned_weights is not None:
            return self._cached_aligned_weights
        return 1.0 - self.sft_weights()

    def _weight_rule(self, name: str) -> tuple[str, float | int]:
        """('block', b) for a tensor that follows block b's live weight, or ('fixed', aligned weight)."""
        part = classify(name)
        if part.part == "layer":
            return "block", self.block_of_layer[part.layer]
        if part.part == "head" and self.head_block:
            return "block", len(self.block_layers) - 1
        return "fixed", self.embed_aligned_weight if part.part == "embed" else self.head_aligned_weight

    def _weight_source(self, name: str):
        kind, value = self._weight_rule(name)
        if kind == "fixed":
            return lambda: value
        return lambda: self.aligned_weights()[value]

    def block_weights(self) -> list[dict]:
        """Per block: index, layers (or "head"), and its SFT and aligned weights now."""
        with torch.no_grad():
            s = self.sft_weights().tolist()
        return [{"block": b, "layers": layers, "sft_weight": s[b], "aligned_weight": 1.0 - s[b]}
                for b, layers in enumerate(self.block_layers)]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The block logits, each once: what to give the optimizer."""
        return list(self.block_logits)

    # ---- the merged model ---------------------------------------------------------------------
    def _build_merged_model(self, sft_model: nn.Module, aligned_model: nn.Module) -> nn.Module:
        # Structure, config and buffers of the SFT model; parameters shared, not copied.
        memo = {id(t): t for t in list(sft_model.parameters()) + list(sft_model.buffers())}
        shell = copy.deepcopy(sft_model, memo)
        sft_modules = dict(sft_model.named_modules(remove_duplicate=False))
        aligned_modules = dict(aligned_model.named_modules(remove_duplicate=False))
        self._linear_layers: list[tuple[int, int]] = []  # (block, layer) of every Linear in a live block
        for path, module in list(shell.named_modules(remove_duplicate=False)):
            direct = [(n, p) for n, p in module._parameters.items() if p is not None]
            if not direct:
                continue
            sft_mod, aligned_mod = sft_modules[path], aligned_modules[path]
            first = self._canonical[id(direct[0][1])]
            source = self._weight_source(first)
            if isinstance(module, nn.Linear) or _is_conv1d(module):
                replacement: nn.Module = MergedLinear(sft_mod, aligned_mod, source, transposed=_is_conv1d(module))
                kind, block = self._weight_rule(first)
                if kind == "block":
                    layer = classify(first).layer
                    self._linear_layers.append((block, self.num_layers if layer is None else layer))
            elif type(module) is nn.Embedding:
                replacement = MergedEmbedding(sft_mod, aligned_mod, source)
            else:
                merge_parameters_on_call(module, sft_mod, aligned_mod, source)
                continue
            parent_path, _, attr = path.rpartition(".")
            parent = shell.get_submodule(parent_path) if parent_path else shell
            setattr(parent, attr, replacement)
        return shell

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs):
        self._cached_aligned_weights = 1.0 - self.sft_weights()  # one graph node per step, shared by all layers
        try:
            return self.merged_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        finally:
            self._cached_aligned_weights = None

    def regularizer(self) -> torch.Tensor:
        """reg * sum over Linears in live blocks of w(layer) * |s_b - s0| (the head counts as layer L)."""
        s = self.sft_weights()
        coefficients = torch.tensor(self._reg_coefficients, dtype=s.dtype, device=s.device)
        return self.reg * (coefficients * (s - self.sft_mean).abs()).sum()

    # ---- export -------------------------------------------------------------------------------
    def aligned_weight_by_tensor(self) -> dict[str, float]:
        """The aligned weight each checkpoint tensor gets when exported."""
        with torch.no_grad():
            a = (1.0 - self.sft_weights()).tolist()
        out = {}
        for name in _unique_state(self.sft_model):
            kind, value = self._weight_rule(name)
            out[name] = a[value] if kind == "block" else value
        return out

    def summary(self) -> dict:
        weights = self.block_weights()
        by_layer = [None] * self.num_layers
        for w in weights:
            if w["layers"] != "head":
                for layer in w["layers"]:
                    by_layer[layer] = w["aligned_weight"]
        return {
            "blocks": weights,
            "aligned_weight_by_layer": by_layer,
            "embed_aligned_weight": self.embed_aligned_weight,
            "head_aligned_weight": weights[-1]["aligned_weight"] if self.head_block else self.head_aligned_weight,
            "settings": {"blocks": self.block_spec, "head_block": self.head_block, "sft_mean": self.sft_mean,
                         "eps": self.eps, "reg": self.reg, "reg_weighting": self.reg_weighting},
            "convention": "theta = (1 - aligned_weight) * theta_sft + aligned_weight * theta_aligned",
        }

    def export_merged(self, out_dir: str | os.PathLike, tokenizer=None, overwrite: bool = False,
                      max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> dict:
        """Write the merged model as a normal HF checkpoint (streamed) plus ama_weights.json."""
        sft_state, aligned_state = _unique_state(self.sft_model), _unique_state(self.aligned_model)
        aligned_state = {n: aligned_state[n] for n in sft_state}
        weights = {n: (1.0 - a, a) for n, a in self.aligned_weight_by_tensor().items()}
        summary = self.summary()
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            written = write_merged([InMemoryCheckpoint(sft_state), InMemoryCheckpoint(aligned_state)], weights, tmp,
                                   max_shard_size, labels=["sft model", "aligned model"])
            self.sft_model.config.save_pretrained(tmp)
            generation_config = getattr(self.sft_model, "generation_config", None)
            if generation_config is not None:
                generation_config.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            (Path(tmp) / WEIGHTS_NAME).write_text(json.dumps(summary, indent=2) + "\n")
        return {**summary, **written, "out_dir": str(out_dir)}


def _config_dict(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    return config.to_dict() if config is not None and hasattr(config, "to_dict") else {}


def _shares_output_embedding(model: nn.Module) -> bool:
    try:
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    return out is not None and inp is not None and out.weight is inp.weight


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without tied duplicates (first name kept, as save_pretrained does for embeddings)."""
    seen, out = set(), {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else (name,)
        if key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


__all__: Sequence[str] = ["AdaptiveModelAverager", "split_layers", "parse_block_spec", "layer_regularizer_weight"]
