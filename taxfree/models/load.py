"""Loading models and tokenizers with one-line errors instead of library tracebacks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from taxfree.errors import TaxfreeError

_warned_remote_code = False
# Any one of these makes a directory a tokenizer (fast, sentencepiece, BPE vocab, or configured).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model",
                    "vocab.txt", "sentencepiece.bpe.model")


def warn_trust_remote_code(where: str) -> None:
    """One stderr line per process: with trust_remote_code a model directory's Python code runs."""
    global _warned_remote_code
    if _warned_remote_code:
        return
    _warned_remote_code = True
    print(f"warning: {where} is true: Python code shipped with the models and tokenizers will run on this "
          "machine; use it only with sources you trust", file=sys.stderr, flush=True)


def _check_dir(path: str, what: str) -> None:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise TaxfreeError(f"{path}: {what} is a file, expected a model directory")


def load_tokenizer(path: str, trust_remote_code: bool = False, padding_side: str | None = None):
    from transformers import AutoTokenizer

    _check_dir(path, "tokenizer")
    p = Path(path)
    if p.is_dir() and not any((p / f).is_file() for f in _TOKENIZER_FILES) and not any(p.glob("*.tiktoken")):
        raise TaxfreeError(f"{path}: no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}, ...)")
    if trust_remote_code:
        warn_trust_remote_code("models.trust_remote_code")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # a user's files: OSError, ValueError, and the tokenizers library's own errors
        raise TaxfreeError(f"{path}: cannot load tokenizer: {_first_line(e)}") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise TaxfreeError(f"{path}: tokenizer has neither a pad nor an eos token (batches need one to pad with; "
                               "set pad_token or eos_token in its tokenizer_config.json)")
        tok.pad_token = tok.eos_token
    if padding_side is not None:
        tok.padding_side = padding_side
    from taxfree.models.chat_templates import apply_run_chat_template

    apply_run_chat_template(tok)  # models.chat_template, for tokenizers that have none
    return tok


def load_causal_lm(path: str, trust_remote_code: bool = False, dtype=None):
    from transformers import AutoModelForCausalLM

    _check_dir(path, "model")
    p = Path(path)
    if p.is_dir() and not (p / "config.json").is_file():
        raise TaxfreeError(f"{path}: not a model directory (no config.json)")
    if trust_remote_code:
        warn_trust_remote_code("models.trust_remote_code")
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=trust_remote_code, dtype=dtype if dtype is not None else "auto"
        )
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise TaxfreeError(f"{path}: cannot load model: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def check_model_dir(path: str) -> dict:
    """Open a model directory as far as it can be without loading weights; return its config.

    Catches what would otherwise fail minutes later inside transformers: no or garbage
    config.json, no weights, pickle-only weights (never loaded: safetensors only), truncated or
    corrupt safetensors headers, a shard the index names but that is missing.
    """
    from taxfree.merging.checkpoint import Checkpoint

    p = Path(path)
    if not p.is_dir():
        raise TaxfreeError(f"{path}: model directory not found")
    config_path = p / "config.json"
    if not config_path.is_file():
        raise TaxfreeError(f"{path}: not a model directory (no config.json)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise TaxfreeError(f"{config_path}: not a UTF-8 text file") from None
    except json.JSONDecodeError as e:
        raise TaxfreeError(f"{config_path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(config, dict):
        raise TaxfreeError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise TaxfreeError(f"{config_path}: no model_type (transformers cannot tell which architecture it is)")
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING and "auto_map" not in config:
        raise TaxfreeError(f"{config_path}: model_type {model_type!r} is not an architecture this transformers knows")
    if any(p.glob("*.gguf")) and not any(p.glob("*.safetensors")):
        return config  # GGUF weights: transformers reads them itself
    Checkpoint(p).close()  # config and every safetensors header, checked against the file sizes
    return config


def check_tokenizer(path: str, trust_remote_code: bool = False, needs_eos: bool = False, what: str = "training"):
    """Load a tokenizer as the stages will; an eos token is required where sequences must end."""
    tok = load_tokenizer(path, trust_remote_code=trust_remote_code)
    if needs_eos:
        require_eos(tok, path, what)
    return tok


def require_eos(tokenizer, path: str, what: str = "training") -> None:
    if tokenizer.eos_token is None:
        raise TaxfreeError(f"{path}: tokenizer has no eos token, which {what} needs to end sequences "
                           "(set eos_token in its tokenizer_config.json)")


def check_vocab(tokenizer, tokenizer_path: str, model_config: dict, model_path: str) -> None:
    """Every token id the tokenizer can produce must have a row in the model's embedding."""
    vocab = model_config.get("vocab_size")
    if not isinstance(vocab, int) or isinstance(vocab, bool):
        return
    n = len(tokenizer)
    if n > vocab:
        raise TaxfreeError(f"{tokenizer_path}: tokenizer has {n} tokens but the model in {model_path} has "
                           f"vocab_size {vocab} (a tokenizer from another model?)")
