"""Offline tokenizer training, saved so that both transformers 4 and 5 load it."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers


def train_tokenizer(
    texts: list[str],
    out_dir: str | Path,
    vocab_size: int = 512,
    special_tokens: list[str] | None = None,
    chat_template: str | None = None,
    pad_token: str = "<|pad|>",
    bos_token: str = "<|bos|>",
    eos_token: str = "<|eos|>",
):
    """Byte-level BPE (decodes back to the exact text) with pad/bos/eos and a chat template."""
    from transformers import PreTrainedTokenizerFast

    special_tokens = list(special_tokens or [pad_token, bos_token, eos_token])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=pad_token,
        bos_token=bos_token,
        eos_token=eos_token,
        model_input_names=["input_ids", "attention_mask"],
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    # transformers 5 writes its own class name; 4.x needs the classic one to load the folder.
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["model_input_names"] = ["input_ids", "attention_mask"]
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return fast
