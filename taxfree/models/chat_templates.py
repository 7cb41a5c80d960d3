"""Chat templates for tokenizers that have none (`models.chat_template`).

Base models (OpenLLaMA, Pythia, GPT-2) and encoder reward backbones (BERT, MiniLM) ship no chat
template, yet conversational records (HH-RLHF, UltraFeedback, chitchat) are rendered through
one by every trainer and scorer. A run names one template for all of them; a tokenizer that has
its own keeps it. The template becomes part of every tokenizer the run saves, so later stages
and other tools render the same text.

Built-in names:
- `plain`: "user: ...\\nassistant: ...\\n" lines, the model's BOS (or an encoder's CLS) first and
  EOS after each assistant turn, so a base model learns to stop and a BERT-style classifier
  pools its first token as it was trained to;
- `hh`: Anthropic HH-RLHF's transcript, "\\n\\nHuman: ...\\n\\nAssistant: ..." (EOS after each
  assistant turn; a system message is rendered as a Human turn), for base models trained on HH
  (the AMA paper's OpenLLaMA-3B, EXO's Pythia-2.8B);
- `chatml`: <|im_start|>role\\ncontent<|im_end|> (Qwen, SmolLM), for tokenizers that have those tokens.
Anything else is a Jinja template: the text itself (it contains "{{" or "{%") or a .jinja file.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from taxfree.errors import TaxfreeError

BUILTIN = {
    "plain": (
        "{{ cls_token or bos_token or '' }}"
        "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}"
        "{% if message['role'] == 'assistant' %}{{ eos_token or '' }}{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    ),
    "hh": (
        "{{ bos_token or '' }}{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}{{ '\\n\\nAssistant: ' + message['content'] }}{{ eos_token or '' }}"
        "{% else %}{{ '\\n\\nHuman: ' + message['content'] }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '\\n\\nAssistant:' }}{% endif %}"
    ),
    "chatml": (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}{{ '\\n' }}{{ message['content'] }}<|im_end|>"
        "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}"
    ),
}

_run_template: str | None = None


def resolve_chat_template(value: str | None) -> str | None:
    """A built-in name, Jinja text, or a .jinja file -> the template text (None stays None)."""
    if value is None:
        return None
    if value in BUILTIN:
        return BUILTIN[value]
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TaxfreeError(f"{value}: cannot read the chat template: {e}") from None
    raise TaxfreeError(f"chat template {value!r}: not a built-in ({', '.join(BUILTIN)}), a Jinja template "
                       "or a .jinja file")


@contextlib.contextmanager
def run_chat_template(template: str | None) -> Iterator[None]:
    """While a run's stages execute, tokenizers loaded without a template get `template`."""
    global _run_template
    previous, _run_template = _run_template, template
    try:
        yield
    finally:
        _run_template = previous


def apply_run_chat_template(tokenizer) -> None:
    if _run_template is not None and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = _run_template
