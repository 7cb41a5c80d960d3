"""Loading models and tokenizers with one-line errors instead of library tracebacks."""

from __future__ import annotations

import warnings
from pathlib import Path

from taxfree.errors import TaxfreeError


def _check_dir(path: str, what: str) -> None:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise TaxfreeError(f"{path}: {what} is a file, expected a model directory")


def load_tokenizer(path: str, trust_remote_code: bool = False, padding_side: str | None = None):
    from transformers import AutoTokenizer

    _check_dir(path, "tokenizer")
    if trust_remote_code:
        warnings.warn(f"trust_remote_code is on: code from {path} will run", stacklevel=2)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise TaxfreeError(f"{path}: cannot load tokenizer: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise TaxfreeError(f"{path}: tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    if padding_side is not None:
        tok.padding_side = padding_side
    return tok


def load_causal_lm(path: str, trust_remote_code: bool = False, dtype=None):
    from transformers import AutoModelForCausalLM

    _check_dir(path, "model")
    p = Path(path)
    if p.is_dir() and not (p / "config.json").is_file():
        raise TaxfreeError(f"{path}: not a model directory (no config.json)")
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=trust_remote_code, dtype=dtype if dtype is not None else "auto"
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise TaxfreeError(f"{path}: cannot load model: {str(e).splitlines()[0]}") from None
