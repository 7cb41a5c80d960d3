"""Score (prompt, response) pairs with a sequence-classification reward model.

The reward axis of the reward-vs-tax plot is the mean reward-model score of each model's
responses, so scoring must (1) format a pair the way the reward model saw it in training and
(2) give a sequence the same score whatever else is in its batch.

(1) Formatting follows TRL's RewardTrainer, which trains the project's reward models: a
message-list prompt is rendered with the tokenizer's chat template, the response appended as
an assistant turn; a string prompt is `prompt + response`, with the EOS token appended when the
response does not already end with it.

(2) Decoder reward models (`LlamaForSequenceClassification` and friends) put a score on every
token and read the one at the "last non-pad token", which transformers locates as the rightmost
token whose id differs from `pad_token_id`. We read the per-token scores ourselves (a hook on
the `score` head) at the position that rule gives on the sequence *alone*: its last real token
(by the attention mask) that is not the pad id. So left and right padding, and tokenizers whose
pad token is their EOS token, give the score of the unpadded sequence. Encoder reward models
(BERT-like: a classifier on the first token) get right padding and their own pooled output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from taxfree.errors import TaxfreeError


def _is_messages(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt)


def format_reward_input_ids(tokenizer, prompt, response: str, append_eos: bool = True) -> list[int]:
    """Token ids of one (prompt, response) pair, formatted as TRL's RewardTrainer does."""
    if not isinstance(response, str):
        raise TaxfreeError(f"reward scoring: a response must be a string, got {type(response).__name__}")
    if _is_messages(prompt):
        if not getattr(tokenizer, "chat_template", None):
            raise TaxfreeError(
                "reward scoring: the prompt is a list of messages but the reward model's tokenizer has no chat template"
            )
        messages = list(prompt) + [{"role": "assistant", "content": response}]
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        return list(ids)
    if isinstance(prompt, str):
        text = prompt + response
        eos = tokenizer.eos_token
        if append_eos and eos is not None and not text.endswith(eos):
            text += eos
        return list(tokenizer(text)["input_ids"])
    raise TaxfreeError(f"reward scoring: a prompt must be a string or a list of messages, got {type(prompt).__name__}")


def _score_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Per row: the last attended position whose id is not the pad id (else the last attended)."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    real = attention_mask.bool()
    last_real = torch.where(real, positions, -1).max(dim=1).values
    if pad_token_id is None:
        return last_real
    not_pad = real & (input_ids != pad_token_id)
    last_not_pad = torch.where(not_pad, positions, -1).max(dim=1).values
    return torch.where(last_not_pad >= 0, last_not_pad, last_real)


def load_reward_model(path: str, label: str | int | None = None, trust_remote_code: bool = False):
    """(model in eval mode, its tokenizer, the logit index `label` names or None) of a reward
    model or classifier directory / hub id, with one-line errors."""
    from transformers import AutoModelForSequenceClassification

    from taxfree.models.load import load_tokenizer

    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise TaxfreeError(f"{path}: cannot load the reward model: {str(e).splitlines()[0]}") from None
    tokenizer = load_tokenizer(str(path), trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer, resolve_reward_label(model, label)


def resolve_reward_label(model, label: str | int | None) -> int | None:
    """Which logit of a sequence classifier is the reward: None for a reward model (one logit);
    for a classifier (a sentiment model on IMDB, say) the class named by `label`, by its name in
    the model's `id2label` (case-insensitive) or by index."""
    num_labels = getattr(model.config, "num_labels", None)
    if label is None:
        if num_labels != 1:
            names = ", ".join(str(v) for v in (getattr(model.config, "id2label", None) or {}).values())
            raise TaxfreeError(f"reward scoring: the model is a classifier with {num_labels} labels ({names}): "
                               "name the class whose logit is the reward with reward_label")
        return None
    id2label = {int(k): str(v) for k, v in (getattr(model.config, "id2label", None) or {}).items()}
    if isinstance(label, int) or (isinstance(label, str) and label.isdigit()):
        index = int(label)
        if not 0 <= index < (num_labels or 0):
            raise TaxfreeError(f"reward_label {label}: the model has {num_labels} labels (0..{(num_labels or 1) - 1})")
        return index
    matches = [i for i, name in id2label.items() if name.lower() == str(label).lower()]
    if not matches:
        raise TaxfreeError(f"reward_label {label!r}: not a label of the model "
                           f"(has: {', '.join(id2label[i] for i in sorted(id2label))})")
    return matches[0]


@torch.no_grad()
def score_with_reward_model(
    model,
    tokenizer,
    prompts: Sequence,
    responses: Sequence[str],
    batch_size: int = 8,
    max_length: int | None = None,
    append_eos: bool = True,
    progress: bool = True,
    label: int | None = None,
) -> list[float]:
    """Reward-model score of each (prompt, response) pair, in order.

    `model`: any `AutoModelForSequenceClassification` with `num_labels == 1`, or a classifier
    with `label` = the index of the class whose raw logit is the reward (`resolve_reward_label`;
    TRL's sentiment examples score IMDB the same way). `max_length` caps the tokens of a pair
    (default and upper bound: the model's `max_position_embeddings`): a decoder reward model
    keeps the last ones (it scores the last token, and the response matters most), an encoder
    the first ones (it pools its first token).
    """
    from tqdm.auto import tqdm

    if len(prompts) != len(responses):
        raise TaxfreeError(f"reward scoring: {len(prompts)} prompts but {len(responses)} responses")
    if batch_size < 1:
        raise TaxfreeError(f"reward scoring: batch_size must be >= 1, got {batch_size}")
    num_labels = getattr(model.config, "num_labels", None)
    if label is None and num_labels != 1:
        raise TaxfreeError(f"reward scoring: the reward model must have num_labels=1, this one has {num_labels} "
                           "(a classifier: give the label whose logit is the reward)")
    column = 0 if label is None else label
    if not prompts:
        return []

    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    model_pad_id = getattr(text_config, "pad_token_id", None)
    fill_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if fill_id is None:
        fill_id = model_pad_id if model_pad_id is not None else 0
    head = getattr(model, "score", None)
    per_token = isinstance(head, torch.nn.Module)
    # Never more tokens than the model has positions (a BERT-sized reward backbone has 512, and a
    # sampled response can run past it); `max_length` can ask for fewer.
    limit = max_length
    positions = getattr(text_config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limit = positions if limit is None else min(limit, positions)

    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, _i, out: captured.append(out)) if per_token else None
    # transformers refuses batches > 1 without a pad id; any id works since we pick positions.
    restore_pad = per_token and model_pad_id is None
    if restore_pad:
        text_config.pad_token_id = fill_id
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores: list[float] = []
    try:
        starts = range(0, len(prompts), batch_size)
        for s in tqdm(starts, desc="reward scoring", disable=not progress, total=len(starts)):
            rows = [
                format_reward_input_ids(tokenizer, p, r, append_eos=append_eos)
                for p, r in zip(prompts[s : s + batch_size], responses[s : s + batch_size])
            ]
            if limit is not None:  # a decoder scores the last token: keep the end; an encoder its first
                rows = [r[-limit:] if per_token else r[:limit] for r in rows]
            width = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), fill_id, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):  # right padding; positions are found from the mask
                input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
                attention_mask[i, : len(r)] = 1
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            captured.clear()
            out = model(input_ids=input_ids, attention_mask=attention_mask)
            if per_token and captured and captured[-1].dim() == 3:
                token_scores = captured[-1]  # [batch, seq, 1]
                pos = _score_positions(input_ids, attention_mask, model_pad_id)
                batch_scores = token_scores[torch.arange(len(rows), device=device), pos, column]
            else:
                batch_scores = out.logits[:, column]
            scores.extend(batch_scores.float().cpu().tolist())
    finally:
        if hook is not None:
            hook.remove()
        if restore_pad:
            text_config.pad_token_id = None
        model.train(was_training)
    return scores
