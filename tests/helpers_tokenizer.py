"""A tiny character-level tokenizer for tests: built in-process, no files, no network.

Every printable ASCII character (plus `extra_chars`) is one token; `<pad>`, `<s>`, `</s>` and
`<unk>` are special tokens with ids 0..3. The chat template renders each message as
`<role>: <content>\n` after a `<s>`, and the generation prompt is `assistant: `.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def char_tokenizer(extra_chars: str = "") -> PreTrainedTokenizerFast:
    """One token per character; pad/bos/eos/unk set; a simple chat template."""
    chars = dict.fromkeys(string.printable + extra_chars)  # ordered and de-duplicated
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
