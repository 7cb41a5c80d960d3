"""Per-sequence log-probabilities of labelled tokens: the building block of every log-ratio."""

from __future__ import annotations

import torch

from taxfree.errors import TaxfreeError

IGNORE_INDEX = -100


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(label) over the labelled tokens of each sequence, and how many there were.

    `logits[n, t]` predicts token `t + 1`, so position t's logits are scored against
    `labels[n, t + 1]`; labels equal to -100 (prompt and padding) count for nothing. Logits are
    divided by `temperature` before the log-softmax (EXO scores at the sampling temperature).
    Works in float32 whatever the model's dtype, one sequence at a time when the logits are not
    float32 already, so a bf16 [N, L, V] tensor is never upcast whole.

    Returns `(sum_logp[N], n_tokens[N])`, with the dtype float32 and n_tokens as long.
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise TaxfreeError(
            f"sequence_logps: logits must be [N, L, V] and labels [N, L]; got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if not temperature > 0:
        raise TaxfreeError(f"sequence_logps: temperature must be > 0, got {temperature}")
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    safe_targets = targets.masked_fill(~mask, 0)
    shifted = logits[:, :-1]
    if shifted.dtype == torch.float32:
        rows = [shifted]
    else:
        rows = [shifted[i : i + 1] for i in range(shifted.shape[0])]
    token_logps = []
    for i, row in enumerate(rows):
        row = row.float()
        if temperature != 1.0:
            row = row / temperature
        start = 0 if len(rows) == 1 else i
        tgt = safe_targets[start : start + row.shape[0]]
        picked = row.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        token_logps.append(picked - torch.logsumexp(row, dim=-1))
    per_token = torch.cat(token_logps, dim=0) * mask
    return per_token.sum(dim=-1), mask.sum(dim=-1)
