"""PairRM: a pairwise reward model, loaded from the published PairRM-hf format without llm-blender.

Why our own: llm-blender (the authors' package) is unmaintained and does not import with
transformers 5, but PairRM is only a DeBERTa-v3 encoder plus a two-layer head, so it loads with
transformers' `DebertaV2Model` and a few lines of torch. Everything below reproduces the
published model and its usage; where each piece comes from:

- Weights and config: `llm-blender/PairRM-hf` (`config.json`: `"architectures":
  ["DebertaV2PairRM"]`, `"model_type": "deberta-v2"`, `"n_tasks": 1`, `"drop_out": 0.05`,
  `"source_prefix_id": 128001`, `"cand1_prefix_id": 128002`, `"cand2_prefix_id": 128003`,
  `"cand_prefix_id": 128004`; `added_tokens.json` maps `<|source|>`, `<|candidate1|>`,
  `<|candidate2|>`, `<|candidate|>` to those ids; weights in `model.safetensors`).
- Module layout and state-dict names: llm-blender's `pair_ranker/pairrm.py::DebertaV2PairRM`:
  `pretrained_model` (a `DebertaV2Model`) and `head_layer = Sequential(Dropout, Linear(2H, H),
  Tanh, Dropout, Linear(H, n_tasks))`, so the keys are `pretrained_model.*`, `head_layer.1.*`,
  `head_layer.4.*`.
- Forward: drop the all-padding columns, encode, take the last hidden state at the
  `<|source|>`, `<|candidate1|>` and `<|candidate2|>` positions, score `[src; cand1]` and
  `[src; cand2]` with the head, logit = mean over tasks of (left - right): > 0 means candidate 1
  is better.
- Input format: the PairRM-hf model card's `tokenize_pair`: each of
  `"<|source|>" + source`, `"<|candidate1|>" + cand1`, `"<|candidate2|>" + cand2` is encoded
  separately with the tokenizer's special tokens (`[CLS] ... [SEP]`), the source truncated to
  `source_max_length` = 1224 tokens, each candidate to `(1224 + 2*412 - len(source_ids)) // 2`,
  and the three are concatenated.
- Comparison: llm-blender's `Blender.compare(..., mode="[A,B]+[B,A]")` (the default it
  recommends against position bias) scores both orders and returns
  `logit(A, B) - logit(B, A)` (through `get_scores_from_cmps`, "max_logits"). Our `compare`
  returns exactly that number; `"[A,B]"` / `"[B,A]"` give the one-order logits as there.
- Conversations: `Blender.compare_conversations`' format (instruction line, `USER: ...` turns
  with `Assistant: <Response i>` placeholders as the source; `<Response i>: ...` turns as the
  candidate). Its instruction text, typo included, is kept verbatim because the scores depend
  on the exact tokens.

Deviation (documented, harmless): the prefix tokens are removed from user text before encoding,
so that every row has exactly one of each (the original crashes on such text).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from taxfree.errors import TaxfreeError

PAIRRM_HUB_ID = "llm-blender/PairRM-hf"
SOURCE_PREFIX = "<|source|>"
CANDIDATE1_PREFIX = "<|candidate1|>"
CANDIDATE2_PREFIX = "<|candidate2|>"
CANDIDATE_PREFIX = "<|candidate|>"
PREFIX_TOKENS = (SOURCE_PREFIX, CANDIDATE1_PREFIX, CANDIDATE2_PREFIX, CANDIDATE_PREFIX)
SOURCE_MAX_LENGTH = 1224
CANDIDATE_MAX_LENGTH = 412
# Verbatim from llm-blender's compare_conversations (typo included: the scores depend on it).
CONVERSATION_INSTRUCTION = (
    "Finish the following coversation in each i-th turn by filling in <Response i> with your response."
)
COMPARE_MODES = ("[A,B]+[B,A]", "[A,B]", "[B,A]")

_REQUIRED_CONFIG = ("n_tasks", "drop_out", "source_prefix_id", "cand1_prefix_id", "cand2_prefix_id")
_IGNORED_CHECKPOINT_KEYS = ("pretrained_model.embeddings.position_ids",)


class PairRMModel(nn.Module):
    """DeBERTa-v2 encoder + PairRM head; parameter names match the PairRM-hf checkpoint."""

    def __init__(self, config):
        super().__init__()
        from transformers import DebertaV2Model

        missing = [k for k in _REQUIRED_CONFIG if getattr(config, k, None) is None]
        if missing:
            raise TaxfreeError(f"PairRM config lacks {', '.join(missing)} (not a PairRM-hf config.json)")
        self.config = config
        self.pretrained_model = DebertaV2Model(config)
        hidden = config.hidden_size
        self.head_layer = nn.Sequential(
            nn.Dropout(config.drop_out),
            nn.Linear(2 * hidden, hidden),
            nn.Tanh(),
            nn.Dropout(config.drop_out),
            nn.Linear(hidden, config.n_tasks),
        )

    def _positions(self, input_ids: torch.Tensor, token_id: int, name: str) -> torch.Tensor:
        hits = input_ids == token_id
        counts = hits.sum(dim=1)
        if not bool((counts == 1).all()):
            raise TaxfreeError(f"PairRM input: every row needs exactly one {name} token (truncated or malformed input)")
        return hits.int().argmax(dim=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logit that candidate 1 beats candidate 2, one per row."""
        keep = attention_mask.ne(0).any(dim=0)
        input_ids, attention_mask = input_ids[:, keep], attention_mask[:, keep]
        encs = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        src = encs[rows, self._positions(input_ids, self.config.source_prefix_id, SOURCE_PREFIX)]
        c1 = encs[rows, self._positions(input_ids, self.config.cand1_prefix_id, CANDIDATE1_PREFIX)]
        c2 = encs[rows, self._positions(input_ids, self.config.cand2_prefix_id, CANDIDATE2_PREFIX)]
        left = self.head_layer(torch.cat([src, c1], dim=-1))
        right = self.head_layer(torch.cat([src, c2], dim=-1))
        return (left - right).mean(dim=-1)


def _load_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(model_dir / shard)))
        return state
    bin_file = model_dir / "pytorch_model.bin"
    if bin_file.is_file():
        # Older exports ship only a torch pickle: load tensors only, never arbitrary objects.
        return torch.load(bin_file, map_location="cpu", weights_only=True)
    raise TaxfreeError(f"{model_dir}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _resolve_dir(path_or_hub_id: str | os.PathLike) -> Path:
    path = Path(path_or_hub_id)
    if path.is_dir():
        return path
    name = str(path_or_hub_id)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise TaxfreeError(f"PairRM: no such directory: {name}")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            repo_id=name,
            # config, tokenizer and weights only: never the training_args.bin pickle
            allow_patterns=["*.json", "*.safetensors", "*.model", "pytorch_model*.bin"],
        )
    except Exception as e:  # offline, unknown repo, no permission: one clear line
        raise TaxfreeError(f"PairRM: cannot fetch {name} from the hub ({type(e).__name__}); pass a local directory") from None
    return Path(local)


def _strip_prefix_tokens(text: str) -> str:
    for tok in PREFIX_TOKENS:
        text = text.replace(tok, " ")
    return text


def _conversation_texts(messages: Sequence[dict], response: str) -> tuple[str, str]:
    """(source, candidate) in Blender.compare_conversations' format for prompt + response."""
    messages = list(messages)
    system = ""
    if messages and messages[0].get("role") == "system":
        system = str(messages[0].get("content", "")) + "\n"
        messages = messages[1:]
    conv = messages + [{"role": "assistant", "content": response}]
    for i, m in enumerate(conv):
        want = "user" if i % 2 == 0 else "assistant"
        if not isinstance(m, dict) or m.get("role") != want or not isinstance(m.get("content"), str):
            raise TaxfreeError(
                "PairRM: a chat prompt must alternate user/assistant messages (an optional system first) "
                "and end with a user message"
            )
    source = "\n".join(
        "USER: " + conv[i]["content"] + f"\nAssistant: <Response {i // 2 + 1}>" for i in range(0, len(conv), 2)
    )
    candidate = "\n".join(f"<Response {i // 2 + 1}>: " + conv[i]["content"] for i in range(1, len(conv), 2))
    return system + CONVERSATION_INSTRUCTION + source, candidate


class PairRM:
    """Pairwise preference between two responses to the same prompt.

    `compare(prompts, responses_a, responses_b)` returns one logit per prompt, > 0 when a is
    better; in the default swap-averaged mode, `compare(p, a, b) == -compare(p, b, a)` exactly
    and identical responses give exactly 0. `preference_probability` turns such a logit into
    P(a beats b) = sigmoid(logit / 2), the mean of the two orders' logits.
    """

    def __init__(
        self,
        model: PairRMModel,
        tokenizer,
        source_max_length: int = SOURCE_MAX_LENGTH,
        candidate_max_length: int = CANDIDATE_MAX_LENGTH,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.source_max_length = source_max_length
        self.candidate_max_length = candidate_max_length
        cfg = model.config
        for token, key in (
            (SOURCE_PREFIX, "source_prefix_id"),
            (CANDIDATE1_PREFIX, "cand1_prefix_id"),
            (CANDIDATE2_PREFIX, "cand2_prefix_id"),
        ):
            tid = tokenizer.convert_tokens_to_ids(token)
            if tid != getattr(cfg, key):
                raise TaxfreeError(
                    f"PairRM: tokenizer maps {token} to {tid} but config.{key} is {getattr(cfg, key)} "
                    "(tokenizer and weights do not belong together)"
                )
        if tokenizer.pad_token_id is None:
            raise TaxfreeError("PairRM: the tokenizer has no pad token")

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike = PAIRRM_HUB_ID,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        **lengths,
    ) -> "PairRM":
        """Load a PairRM-hf directory (or hub id, when the hub is reachable).

        dtype None: float16 on CUDA (as llm-blender runs it), float32 elsewhere.
        """
        from transformers import AutoTokenizer, DebertaV2Config

        model_dir = _resolve_dir(path_or_hub_id)
        if not (model_dir / "config.json").is_file():
            raise TaxfreeError(f"{model_dir}: no config.json (not a PairRM-hf directory)")
        config = DebertaV2Config.from_pretrained(str(model_dir))
        model = PairRMModel(config)
        state = {k: v for k, v in _load_state_dict(model_dir).items() if k not in _IGNORED_CHECKPOINT_KEYS}
        expected = model.state_dict().keys()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise TaxfreeError(
                f"{model_dir}: not a PairRM-hf checkpoint (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        model.load_state_dict(state, strict=True)
        device = torch.device(device)
        if dtype is None:
            dtype = torch.float16 if device.type == "cuda" else torch.float32
        model.to(device=device, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
        return cls(model, tokenizer, **lengths)

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """Write the PairRM-hf layout: config.json, model.safetensors, tokenizer files."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        cfg = self.model.config.to_dict()
        cfg["architectures"] = ["DebertaV2PairRM"]
        (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        self.tokenizer.save_pretrained(str(out))

    # -- encoding --------------------------------------------------------------------------

    def _texts(self, prompt, response: str) -> tuple[str, str]:
        if isinstance(prompt, str):
            return prompt, response
        if isinstance(prompt, (list, tuple)):
            return _conversation_texts(prompt, response)
        raise TaxfreeError(f"PairRM: a prompt must be a string or a list of messages, got {type(prompt).__name__}")

    def encode_pairs(self, sources: Sequence[str], cand1s: Sequence[str], cand2s: Sequence[str]) -> dict:
        """Token ids of (source, candidate 1, candidate 2) triples, padded on the right."""
        tok = self.tokenizer
        max_length = self.source_max_length + 2 * self.candidate_max_length
        rows = []
        for src, c1, c2 in zip(sources, cand1s, cand2s, strict=True):
            src_ids = tok.encode(
                SOURCE_PREFIX + _strip_prefix_tokens(src), max_length=self.source_max_length, truncation=True
            )
            cand_len = (max_length - len(src_ids)) // 2
            c1_ids = tok.encode(CANDIDATE1_PREFIX + _strip_prefix_tokens(c1), max_length=cand_len, truncation=True)
            c2_ids = tok.encode(CANDIDATE2_PREFIX + _strip_prefix_tokens(c2), max_length=cand_len, truncation=True)
            rows.append(src_ids + c1_ids + c2_ids)
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, : len(r)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    @torch.no_grad()
    def _one_order(self, sources, cand1s, cand2s, batch_size: int, progress: bool, desc: str) -> list[float]:
        from tqdm.auto import tqdm

        device = next(self.model.parameters()).device
        out: list[float] = []
        starts = range(0, len(sources), batch_size)
        for s in tqdm(starts, desc=desc, disable=not progress, total=len(starts)):
            enc = self.encode_pairs(sources[s : s + batch_size], cand1s[s : s + batch_size], cand2s[s : s + batch_size])
            logits = self.model(enc["input_ids"].to(device), enc["attention_mask"].to(device))
            out.extend(logits.float().cpu().tolist())
        return out

    def compare(
        self,
        prompts: Sequence,
        responses_a: Sequence[str],
        responses_b: Sequence[str],
        batch_size: int = 8,
        mode: str = "[A,B]+[B,A]",
        progress: bool = True,
    ) -> list[float]:
        """Logit per prompt that response a beats response b (> 0: a better)."""
        if not (len(prompts) == len(responses_a) == len(responses_b)):
            raise TaxfreeError(
                f"PairRM.compare: {len(prompts)} prompts, {len(responses_a)} responses_a, {len(responses_b)} responses_b"
            )
        if mode not in COMPARE_MODES:
            raise TaxfreeError(f"PairRM.compare: mode {mode!r} is not one of {', '.join(COMPARE_MODES)}")
        if batch_size < 1:
            raise TaxfreeError(f"PairRM.compare: batch_size must be >= 1, got {batch_size}")
        if not prompts:
            return []
        sources, cands_a, cands_b = [], [], []
        for p, a, b in zip(prompts, responses_a, responses_b):
            if not isinstance(a, str) or not isinstance(b, str):
                raise TaxfreeError("PairRM.compare: responses must be strings")
            src, ca = self._texts(p, a)
            _, cb = self._texts(p, b)
            sources.append(src)
            cands_a.append(ca)
            cands_b.append(cb)
        if mode == "[A,B]":
            return self._one_order(sources, cands_a, cands_b, batch_size, progress, "PairRM [A,B]")
        if mode == "[B,A]":
            return self._one_order(sources, cands_b, cands_a, batch_size, progress, "PairRM [B,A]")
        ab = self._one_order(sources, cands_a, cands_b, batch_size, progress, "PairRM [A,B]")
        ba = self._one_order(sources, cands_b, cands_a, batch_size, progress, "PairRM [B,A]")
        return [x - y for x, y in zip(ab, ba)]


def preference_probability(logit: float) -> float:
    """P(a beats b) from a swap-averaged `compare` logit: sigmoid of the mean of both orders."""
    return float(torch.sigmoid(torch.tensor(logit / 2.0, dtype=torch.float64)))


def win_rate_from_logits(logits: Sequence[float]) -> float:
    """Share of wins: a logit > 0 is a win, < 0 a loss, exactly 0 a tie counted as half a win."""
    if not logits:
        raise TaxfreeError("win rate of zero comparisons")
    wins = sum(1.0 if x > 0 else 0.5 if x == 0 else 0.0 for x in logits)
    return wins / len(logits)


def win_rate(
    pairrm: PairRM,
    prompts: Sequence,
    responses: Sequence[str],
    baseline_responses: Sequence[str],
    batch_size: int = 8,
    progress: bool = True,
) -> float:
    """Win rate of `responses` against `baseline_responses` (e.g. the SFT model's) on the same prompts.

    Swap-averaged comparison; a textually identical pair is a tie (half a win) without asking
    the model, and so is a logit of exactly 0.
    """
    logits = pairrm.compare(prompts, responses, baseline_responses, batch_size=batch_size, progress=progress)
    logits = [0.0 if a == b else x for x, a, b in zip(logits, responses, baseline_responses)]
    return win_rate_from_logits(logits)
