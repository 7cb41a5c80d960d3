"""UltraFeedback binarized: chat preference pairs with GPT-4 scores.

Upstream (HuggingFaceH4/ultrafeedback_binarized, MIT licence): parquet with columns prompt,
prompt_id, chosen and rejected (message lists [user, assistant]), messages (= chosen),
score_chosen, score_rejected; splits train_prefs/test_prefs (pairs), train_sft/test_sft (the
same prompts with the chosen reply), train_gen/test_gen (prompts only). We read the *_prefs
splits. The rw records carry the real scores as rewards instead of 1/0.
"""

from __future__ import annotations

import math

from taxfree.data.converters._common import SkipRecord, UpstreamSchemaError, field, pref_outputs
from taxfree.data.records import validate_record
from taxfree.errors import TaxfreeError

NAME = "ultrafeedback_binarized"
HUB_ID = "HuggingFaceH4/ultrafeedback_binarized"
HUB_CONFIG = None
HUB_SPLITS = {"train_prefs": "train", "test_prefs": "test"}


def _conversation(row: dict, key: str) -> list[dict]:
    messages = field(row, key, list, NAME)
    try:
        validate_record("sft", {"messages": [dict(m) if isinstance(m, dict) else m for m in messages]})
    except TaxfreeError as exc:  # the upstream column is not a chat ending in an assistant reply
        raise UpstreamSchemaError(f"{NAME}: '{key}': {exc}") from None
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def convert(row: dict) -> dict[str, list[dict]]:
    chosen = _conversation(row, "chosen")
    rejected = _conversation(row, "rejected")
    prompt_id = field(row, "prompt_id", str, NAME)
    scores = (field(row, "score_chosen", (int, float), NAME), field(row, "score_rejected", (int, float), NAME))
    if not all(math.isfinite(s) for s in scores):
        raise SkipRecord("non-finite score")
    prompt = chosen[:-1]
    if not prompt:
        raise SkipRecord("conversation has no prompt before the reply")
    if rejected[:-1] != prompt:
        raise SkipRecord("chosen and rejected conversations differ before the final reply")
    if chosen[-1] == rejected[-1]:
        raise SkipRecord("chosen and rejected replies are identical")
    pref = {"prompt": prompt, "chosen": [chosen[-1]], "rejected": [rejected[-1]], "id": prompt_id}
    return pref_outputs(pref, rewards=scores)
