"""`sample`: K completions per training prompt from a policy, each scored by the reward model.

Writes `rw.jsonl` (EXO's reward-labelled format: what exo-rw and dpo-rw train on) and
`collected.jsonl` (the best-of-K completion per prompt as SFT records: AMA's "collected" data).
Work is done in chunks of prompts, each written atomically with its own seed, so a killed run
continues at the first missing chunk and nothing is sampled twice. A chunk's samples depend only
on the experiment seed, the chunk's index and prompts and the sampling settings (all in the
stage key), not on the chunks before it, so on the same device a resumed run's chunks,
`rw.jsonl` and `collected.jsonl` are byte for byte an uninterrupted run's (tested by
tests/test_kill_resume.py). Both files are written atomically at the end, before the manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from taxfree.atomic import atomic_write_text
from taxfree.console import log
from taxfree.data.records import completion_text, read_jsonl, write_jsonl
from taxfree.data.tiny_world import gold_reward
from taxfree.errors import TaxfreeError
from taxfree.models.load import load_causal_lm, load_tokenizer
from taxfree.losses.methods import align_method
from taxfree.pipeline.paths import is_model_ref
from taxfree.pipeline.resolve import data_source, sft_model_source, tokenizer_source
from taxfree.pipeline.schema import require
from taxfree.pipeline.stages import Stage


@dataclass
class SampleStageConfig:
    """K completions per training prompt from a policy, scored by the reward model."""

    policy: str | None = None  # null = the run's SFT model
    # The scorer: null = the run's rm model; or any sequence classifier (a model id or directory),
    # e.g. a sentiment classifier for EXO's IMDB task, with reward_label naming the class whose
    # logit is the reward (by id2label name or index; null for a one-logit reward model).
    reward_model: str | None = None
    reward_label: str | None = None
    prompts: Literal["pref_train", "sft_train"] = "pref_train"
    num_completions: int = 4
    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 128
    max_prompts: int | None = None
    batch_size: int = 16
    score_batch_size: int = 16
    chunk_size: int = 64

    def check(self):
        require(self.num_completions >= 2, "num_completions", "must be >= 2")
        require(self.temperature > 0, "temperature", "must be > 0 (sampling)")
        require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        require(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        require(self.batch_size >= 1 and self.score_batch_size >= 1, "batch_size", "must be >= 1")
        require(self.chunk_size >= 1, "chunk_size", "must be >= 1")
        require(self.max_prompts is None or self.max_prompts >= 1, "max_prompts", "must be >= 1")
        for key in ("policy", "reward_model"):
            require(is_model_ref(getattr(self, key)), key, f"model directory not found: {getattr(self, key)}")


def needs_samples(cfg) -> bool:
    """Reward-labelled samples feed the methods that train on samples (exo-rw, dpo-rw), pairs
    drawn from samples (align.pref_pairs: samples), and AMA's collected data unless ama.data is
    given or AMA samples the aligned models itself."""
    if any(align_method(m).needs_samples for m in cfg.align.methods) or cfg.align.pref_pairs == "samples":
        return True
    return cfg.ama.data is None and cfg.ama.collect_from == "sample" and (cfg.stages is None or "ama" in cfg.stages)


_KINDS = {"pref_train": "pref", "sft_train": "sft"}


def policy_source(cfg):
    if cfg.sample.policy is not None:
        return None, cfg.sample.policy
    return sft_model_source(cfg)


def reward_model_source(cfg):
    if cfg.sample.reward_model is not None:
        return None, cfg.sample.reward_model
    return "rm", str(cfg.stage_dir("rm") / "model")


def inputs(cfg) -> dict:
    return {
        "policy": policy_source(cfg),
        "reward_model": reward_model_source(cfg),
        "prompts": data_source(cfg, cfg.sample.prompts),
        "tokenizer": tokenizer_source(cfg),
    }


def section(cfg) -> dict:
    return {"sample": dataclasses.asdict(cfg.sample), "seed": cfg.seed}


def unique_prompts(records: list[dict]) -> list:
    """Prompts in first-seen order, each once (preference data repeats prompts)."""
    seen, out = set(), []
    for r in records:
        p = r["prompt"] if "prompt" in r else r["messages"][:-1]
        key = json.dumps(p, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def render_prompt(tokenizer, prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise TaxfreeError("sample: the prompts are chat messages but the tokenizer has no chat template")
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def chunk_seed(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"sample-{seed}-{index}".encode()).digest()[:4], "little")


@torch.no_grad()
def generate(model, tokenizer, prompts: list, k: int, temperature: float, top_p: float, max_new_tokens: int,
             batch_size: int, seed: int) -> list[list[str]]:
    """K sampled completions per prompt; batched, left-padded, deterministic for `seed`."""
    tokenizer.padding_side = "left"
    texts = [render_prompt(tokenizer, p) for p in prompts]
    expanded = [t for t in texts for _ in range(k)]
    outs: list[str] = []
    gen = torch.Generator().manual_seed(seed)
    for i in range(0, len(expanded), batch_size):
        batch = expanded[i : i + batch_size]
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new = out[:, enc["input_ids"].shape[1] :]
        outs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    return [[c.strip() for c in outs[j * k : (j + 1) * k]] for j in range(len(prompts))]


def load_reward_scorer(cfg):
    """(model, tokenizer, label) that score samples: `sample.reward_model` with `reward_label`, or
    the run's rm model."""
    from taxfree.eval.reward import load_reward_model

    _, rm_dir = reward_model_source(cfg)
    return load_reward_model(rm_dir, cfg.sample.reward_label, cfg.models.trust_remote_code)


def sample_prompts(cfg) -> list:
    """The distinct prompts the sample settings draw from (sample.prompts, sample.max_prompts)."""
    sec = cfg.sample
    _, prompts_path = data_source(cfg, sec.prompts)
    if prompts_path is None:
        raise TaxfreeError(f"{cfg.source}: data.{sec.prompts}: required to sample")
    prompts = unique_prompts(read_jsonl(prompts_path, _KINDS[sec.prompts]))
    if sec.max_prompts is not None:
        prompts = prompts[: sec.max_prompts]
    if not prompts:
        raise TaxfreeError(f"{prompts_path}: no prompts to sample from")
    return prompts


def sample_and_score(policy, tokenizer, prompts: list, scorer, sec, seed: int) -> list[dict]:
    """K completions per prompt from `policy`, each scored: rw records (prompt, completions, rewards)."""
    from taxfree.eval.reward import score_with_reward_model

    reward_model, rm_tok, label = scorer
    k = sec.num_completions
    completions = generate(policy, tokenizer, prompts, k, sec.temperature, sec.top_p, sec.max_new_tokens,
                           sec.batch_size, seed)
    flat_prompts = [p for p in prompts for _ in range(k)]
    flat = [c for cs in completions for c in cs]
    scores = score_with_reward_model(reward_model, rm_tok, flat_prompts, flat, batch_size=sec.score_batch_size,
                                     progress=False, label=label)
    records = []
    for j, p in enumerate(prompts):
        # Chat prompts get chat completions (one format per record, as TRL expects).
        cs = completions[j] if isinstance(p, str) else [[{"role": "assistant", "content": c}] for c in completions[j]]
        records.append({"prompt": p, "completions": cs, "rewards": scores[j * k : (j + 1) * k]})
    return records


def best_of_k(records: list[dict]) -> list[dict]:
    """AMA's collected data: each prompt's highest-reward completion as an sft record."""
    collected = []
    for r in records:
        best = max(range(len(r["rewards"])), key=r["rewards"].__getitem__)
        prompt = r["prompt"] if isinstance(r["prompt"], list) else [{"role": "user", "content": r["prompt"]}]
        text = completion_text(r["completions"][best])
        collected.append({"messages": prompt + [{"role": "assistant", "content": text}],
                          "reward": r["rewards"][best]})
    return collected


def run(ctx) -> dict:
    from tqdm.auto import tqdm

    cfg, sec = ctx.cfg, ctx.cfg.sample
    trust = cfg.models.trust_remote_code
    _, policy_path = policy_source(cfg)
    _, tok_path = tokenizer_source(cfg)
    prompts = sample_prompts(cfg)
    tokenizer = load_tokenizer(tok_path, trust_remote_code=trust)
    policy = load_causal_lm(policy_path, trust_remote_code=trust).eval()
    scorer = load_reward_scorer(cfg)

    chunk_dir = ctx.dir / "chunks"
    chunk_dir.mkdir(parents=True, exist_ok=True)
    n_chunks = (len(prompts) + sec.chunk_size - 1) // sec.chunk_size
    done = sum((chunk_dir / f"{i:05d}.jsonl").is_file() for i in range(n_chunks))
    if done:
        log(f"sample: {done}/{n_chunks} chunks already done, continuing")
    bar = tqdm(total=len(prompts), desc="sample", unit="prompt", initial=min(done * sec.chunk_size, len(prompts)))
    for i in range(n_chunks):
        path = chunk_dir / f"{i:05d}.jsonl"
        if path.is_file():
            continue
        chunk = prompts[i * sec.chunk_size : (i + 1) * sec.chunk_size]
        lines = [json.dumps(r, ensure_ascii=False)
                 for r in sample_and_score(policy, tokenizer, chunk, scorer, sec, chunk_seed(cfg.seed, i))]
        atomic_write_text(path, "\n".join(lines) + "\n")
        bar.update(len(chunk))
    bar.close()

    records = []
    for i in range(n_chunks):
        records.extend(read_jsonl(chunk_dir / f"{i:05d}.jsonl", "rw"))
    collected = best_of_k(records)
    write_jsonl(ctx.dir / "rw.jsonl", records, kind="rw")
    write_jsonl(ctx.dir / "collected.jsonl", collected, kind="sft")
    all_rewards = [x for r in records for x in r["rewards"]]
    metrics = {
        "prompts": len(records),
        "num_completions": sec.num_completions,
        "mean_reward": sum(all_rewards) / len(all_rewards),
        "mean_best_reward": sum(c["reward"] for c in collected) / len(collected),
    }
    if cfg.world.kind == "tiny":  # the tiny world can say how good the samples really are
        metrics["mean_gold_reward"] = sum(gold_reward(completion_text(c)) for r in records for c in r["completions"]) / len(all_rewards)
        metrics["mean_best_gold_reward"] = sum(gold_reward(c["messages"][-1]["content"]) for c in collected) / len(collected)
    return metrics


STAGE = Stage(
    name="sample",
    help="sample K completions per prompt and score them with the reward model",
    config=SampleStageConfig,
    inputs=inputs,
    section=section,
    run=run,
    applies=needs_samples,
    checkpoints={"policy": "causal_lm", "reward_model": "classifier"},
)

