"""IMDB reviews -> EXO's sentiment task: continue the first words of a review (goal: positive).

Upstream (stanfordnlp/imdb; Maas et al. 2011, for research use): parquet with columns text and
label (0 negative, 1 positive, -1 in the unlabelled "unsupervised" split).
Each review ("<br />" line breaks turned into newlines, as EXO did) becomes:
- prompt: the first PROMPT_WORDS (8) whitespace-separated words, the sampling prompt;
- sft: that prompt with the rest of the review as completion (leading whitespace kept, so
  prompt + completion is the cleaned review), the SFT data of the EXO IMDB runs;
- text: the whole cleaned review.
EXO cut 10 GPT-2 tokens (about 8 words); cutting on words keeps this independent of the
tokenizer. Every record keeps "sentiment" (positive/negative/unlabelled) from the upstream label.
"""

from __future__ import annotations

import re

from taxfree.data.converters._common import SkipRecord, UpstreamSchemaError, field

NAME = "imdb"
HUB_ID = "stanfordnlp/imdb"
HUB_CONFIG = None
HUB_SPLITS = {"train": "train", "test": "test"}

PROMPT_WORDS = 8
SENTIMENT = {0: "negative", 1: "positive", -1: "unlabelled"}
_LINE_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


def clean_review(text: str) -> str:
    return _LINE_BREAK.sub("\n", text).strip()


def split_prompt(text: str, words: int = PROMPT_WORDS) -> tuple[str, str]:
    """(first `words` words, the rest with its leading whitespace); SkipRecord if nothing is left."""
    match = re.match(r"\s*(?:\S+\s+){%d}\S+" % (words - 1), text)
    if match is None or not text[match.end():].strip():
        raise SkipRecord(f"review shorter than {words + 1} words")
    return match.group(0), text[match.end():]


def convert(row: dict, prompt_words: int = PROMPT_WORDS) -> dict[str, list[dict]]:
    text = clean_review(field(row, "text", str, NAME))
    label = field(row, "label", int, NAME)
    if label not in SENTIMENT:
        raise UpstreamSchemaError(f"{NAME}: 'label' must be 0, 1 or -1, got {label}")
    sentiment = SENTIMENT[label]
    prompt, rest = split_prompt(text, prompt_words)
    return {
        "prompt": [{"prompt": prompt, "sentiment": sentiment}],
        "sft": [{"prompt": prompt, "completion": rest, "sentiment": sentiment}],
        "text": [{"text": text, "sentiment": sentiment}],
    }
