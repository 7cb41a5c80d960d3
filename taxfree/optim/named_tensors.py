"""Name -> tensor lookup over a model, a state dict, or an HF checkpoint on disk.

The task vector tau = theta_ref - theta_base is paired by parameter name (docs/algorithms.md 1.2),
and ref/base come in whatever form the caller has: a loaded model, a state dict, or a
checkpoint directory of safetensors (sharded with an index, or not). Checkpoints are read one
tensor at a time, so building tau never holds a whole extra model in memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from taxfree.errors import TaxfreeError

# Wrapper path components added by DDP, torch.compile, FSDP1 and activation checkpointing.
_WRAPPER_COMPONENTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def canonical_name(name: str) -> str:
    """The parameter name without wrapper components, so a wrapped policy matches a plain ref."""
    parts = name.split(".")
    if parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(p for p in parts if p not in _WRAPPER_COMPONENTS)


class NamedTensors:
    """Read-only access to named tensors; `role` ("ref", "base") names the source in errors."""

    def __init__(self, source: Any, role: str):
        self.role = role
        self._tensors: Mapping[str, Tensor] | None = None
        self._files: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        if isinstance(source, nn.Module):
            self.description = f"{role} model"
            self._tensors = dict(source.named_parameters(remove_duplicate=False))
        elif isinstance(source, Mapping):
            self.description = f"{role} state dict"
            bad = [k for k, v in source.items() if not isinstance(v, Tensor)]
            if bad:
                raise TaxfreeError(f"{role} state dict: {bad[0]!r} is not a tensor")
            self._tensors = source
        elif isinstance(source, (str, os.PathLike)):
            self.description = f"{role} checkpoint {os.fspath(source)}"
            self._files = _safetensors_weight_map(Path(source), role)
        else:
            raise TaxfreeError(
                f"{role}: expected a model, a state dict or a checkpoint path, got "
                f"{type(source).__name__}"
            )
        names = self._tensors.keys() if self._tensors is not None else self._files.keys()
        self._canonical = {canonical_name(n): n for n in names}

    def get(self, name: str) -> Tensor:
        """The full (unsharded) tensor for `name`; a clear error if the source lacks it."""
        available = self._tensors if self._tensors is not None else self._files
        key = name if name in available else self._canonical.get(canonical_name(name))
        if key is None:
            raise TaxfreeError(f"{self.description} has no tensor named {name!r}")
        if self._tensors is not None:
            tensor = self._tensors[key]
            if hasattr(tensor, "ds_id") and tensor.numel() == 0:  # a placeholder of ZeRO-3
                raise TaxfreeError(
                    f"{self.description} is partitioned by DeepSpeed ZeRO-3 ({name!r} is empty "
                    "here): pass its checkpoint path or a state dict"
                )
        else:
            tensor = self._handle(self._files[key]).get_tensor(key)
        return _full(tensor.detach())

    def _handle(self, path: Path):
        from safetensors import safe_open

        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
        return self._handles[path]


def _full(tensor: Tensor) -> Tensor:
    """A DTensor (FSDP2-sharded ref/base model) gathered to its full value; others as they are."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        return tensor.full_tensor()
    return tensor


def _safetensors_weight_map(path: Path, role: str) -> dict[str, Path]:
    """tensor name -> file for a .safetensors file or an HF checkpoint directory."""
    from safetensors import safe_open

    if not path.exists():
        raise TaxfreeError(f"{role} checkpoint {path} does not exist")
    if path.is_file():
        files = [path]
    else:
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise TaxfreeError(f"{index}: not a safetensors index ({e})") from None
            return {name: path / file for name, file in weight_map.items()}
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise TaxfreeError(f"{role} checkpoint {path} has no *.safetensors file")
    weight_map: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    weight_map[name] = file
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise TaxfreeError(f"{file}: not a readable safetensors file ({e})") from None
    return weight_map
