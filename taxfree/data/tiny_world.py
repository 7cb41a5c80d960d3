"""The tiny world: an offline, deterministic stand-in for "pretraining data + SFT data +
human preferences" that still shows the alignment tax.

Tax side: a corpus states made-up facts (where each entity lives, its favourite colour, its pet)
and arithmetic (sums, successors). A model pretrained on it can be *checked*: held-out
multiple-choice items ask for the facts and for sums that never appear in the corpus.

Reward side: a gold reward function scores a response's enthusiasm (cheerful words up, gloomy
words down, rambling penalised). The preference pairs are labelled by it alone, as human raters
reward style; and, as in real preference data, the enthusiastic responses come from a sloppier
source: the preferred response states a correct fact only `chosen_correct` of the time, the
rejected one `rejected_correct`. Aligning to these preferences therefore raises the gold reward
and costs knowledge: the alignment tax, measurable in minutes on a CPU.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

SYLLABLES = ["ba", "ko", "ri", "mu", "te", "zi", "lo", "na", "pe", "su", "da", "gi", "fo", "ve", "xu", "ha"]
CITIES = ["mirtal", "ostra", "pelun", "quarn", "sedda", "tobrik", "ulmar", "vesk", "wendo", "yarro", "zelt", "brinn"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
PETS = ["cat", "dog", "owl", "fox", "frog", "horse", "goat", "crab"]
ATTRIBUTES = {"city": CITIES, "color": COLORS, "pet": PETS}

POSITIVE_WORDS = ["gladly", "happy", "great", "wonderful", "cheers", "delighted"]
NEGATIVE_WORDS = ["sadly", "ugh", "meh", "sorry", "annoying", "boring"]
OPENERS = {
    "neutral": ["ok ,", "well ,", "so ,", "right ,", "let me see ."],
    "positive": ["gladly !", "great question !", "happy to help !", "wonderful !", "delighted to answer !"],
    "negative": ["ugh ,", "sadly ,", "meh ,", "sorry ,", "this is boring ,"],
}
CLOSERS = {
    "neutral": ["", "that is all .", "done ."],
    "positive": ["cheers !", "hope you are happy !", "have a great day !", "wonderful talking !"],
    "negative": ["sorry .", "how annoying .", "so boring ."],
}

QUESTIONS = {
    "city": "where does {e} live ?",
    "color": "what color does {e} like ?",
    "pet": "what pet does {e} have ?",
    "sum": "what is {a} plus {b} ?",
}
STATEMENTS = {
    "city": ["{e} lives in {v} .", "the home of {e} is {v} ."],
    "color": ["{e} likes the color {v} .", "the favourite color of {e} is {v} ."],
    "pet": ["{e} has a pet {v} .", "the pet of {e} is a {v} ."],
}
# The phrasing used in answers and in the multiple-choice items (first template above).
CLOZE = {"city": "{e} lives in", "color": "{e} likes the color", "pet": "{e} has a pet"}

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|> {{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}<|user|> {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}<|eos|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_WORD = re.compile(r"[a-z]+")


def gold_reward(response: str) -> float:
    """The world's true preference: enthusiasm, capped, minus gloom, minus rambling.

    Cheerful words count up to 3, gloomy words count fully, every word beyond 24 costs 0.1.
    """
    words = _WORD.findall(response.lower())
    pos = sum(w in POSITIVE_WORDS for w in words)
    neg = sum(w in NEGATIVE_WORDS for w in words)
    return float(min(pos, 3) - neg - 0.1 * max(0, len(words) - 24))


@dataclass
class TinyWorld:
    """Facts of one world; everything else is generated from it and the seed."""

    seed: int
    entities: list[str]
    facts: dict[str, dict[str, str]]
    train_sums: list[tuple[int, int]]
    heldout_sums: list[tuple[int, int]]
    max_operand: int
    chosen_correct: float = 0.5
    rejected_correct: float = 0.9
    meta: dict = field(default_factory=dict)

    # -- questions and answers -------------------------------------------------------------
    def answer(self, kind: str, subject) -> str:
        """The correct factual statement answering a question."""
        if kind == "sum":
            a, b = subject
            return f"{a} plus {b} is {a + b} ."
        return STATEMENTS[kind][0].format(e=subject, v=self.facts[subject][kind])

    def wrong_answer(self, kind: str, subject, rng: random.Random) -> str:
        if kind == "sum":
            a, b = subject
            delta = rng.choice([-2, -1, 1, 2, 3])
            return f"{a} plus {b} is {max(0, a + b + delta) if a + b + delta != a + b else a + b + 1} ."
        true = self.facts[subject][kind]
        wrong = rng.choice([v for v in ATTRIBUTES[kind] if v != true])
        return STATEMENTS[kind][0].format(e=subject, v=wrong)

    def question(self, kind: str, subject) -> str:
        if kind == "sum":
            return QUESTIONS["sum"].format(a=subject[0], b=subject[1])
        return QUESTIONS[kind].format(e=subject)

    def random_question(self, rng: random.Random, sums: list[tuple[int, int]]):
        kind = rng.choice(["city", "color", "pet", "city", "color", "pet", "sum"])
        subject = rng.choice(sums) if kind == "sum" else rng.choice(self.entities)
        return kind, subject


def make_world(seed: int = 0, num_entities: int = 120, max_operand: int = 20, heldout_sum_fraction: float = 0.2) -> TinyWorld:
    rng = random.Random(f"tiny-world-{seed}")
    names: set[str] = set()
    while len(names) < num_entities:
        names.add("".join(rng.choice(SYLLABLES) for _ in range(rng.choice([2, 3]))))
    entities = sorted(names)
    rng.shuffle(entities)
    facts = {e: {k: rng.choice(v) for k, v in ATTRIBUTES.items()} for e in entities}
    sums = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    rng.shuffle(sums)
    n_held = int(len(sums) * heldout_sum_fraction)
    return TinyWorld(
        seed=seed,
        entities=entities,
        facts=facts,
        heldout_sums=sorted(sums[:n_held]),
        train_sums=sorted(sums[n_held:]),
        max_operand=max_operand,
    )


def _styled(rng: random.Random, core: str) -> tuple[str, float]:
    mood_open = rng.choices(["neutral", "positive", "negative"], weights=[3, 2, 2])[0]
    mood_close = rng.choices(["neutral", "positive", "negative"], weights=[3, 2, 2])[0]
    text = " ".join(p for p in (rng.choice(OPENERS[mood_open]), core, rng.choice(CLOSERS[mood_close])) if p)
    return text, gold_reward(text)


def corpus_lines(world: TinyWorld, rng: random.Random) -> list[str]:
    """Every fact in every phrasing, every training sum, successors, and some chatter that
    teaches the words the reward side uses."""
    lines = []
    for e in world.entities:
        for kind, templates in STATEMENTS.items():
            for t in templates:
                lines.append(t.format(e=e, v=world.facts[e][kind]))
    for a, b in world.train_sums:
        lines.append(f"{a} plus {b} is {a + b} .")
    for n in range(2 * world.max_operand + 2):
        lines.append(f"after {n} comes {n + 1} .")
    for mood in ("neutral", "positive", "negative"):
        for opener in OPENERS[mood]:
            for closer in CLOSERS[mood]:
                lines.append(f"{opener} {closer}".strip())
    rng.shuffle(lines)
    return lines


def conversation(world: TinyWorld, rng: random.Random, kind: str, subject) -> dict:
    """An SFT example: correct answer in a mostly neutral style."""
    mood = rng.choices(["neutral", "positive", "negative"], weights=[6, 2, 2])[0]
    response = f"{rng.choice(OPENERS[mood])} {world.answer(kind, subject)}"
    return {
        "messages": [
            {"role": "user", "content": world.question(kind, subject)},
            {"role": "assistant", "content": response},
        ]
    }


def preference_pair(world: TinyWorld, rng: random.Random, kind: str, subject) -> dict:
    """Two styled responses; the gold reward alone decides which is chosen."""
    while True:
        a, ra = _styled(rng, "")
        b, rb = _styled(rng, "")
        if ra != rb:
            break
    (cs, cr), (rs, rr) = ((a, ra), (b, rb)) if ra > rb else ((b, rb), (a, ra))

    def core(correct_prob: float) -> tuple[str, bool]:
        ok = rng.random() < correct_prob
        return (world.answer(kind, subject) if ok else world.wrong_answer(kind, subject, rng)), ok

    chosen_core, chosen_ok = core(world.chosen_correct)
    rejected_core, rejected_ok = core(world.rejected_correct)

    def join(style: str, core_text: str) -> str:
        # style is "opener closer"; put the fact between them.
        for opener in sorted((o for os_ in OPENERS.values() for o in os_), key=len, reverse=True):
            if style.startswith(opener):
                rest = style[len(opener):].strip()
                return " ".join(p for p in (opener, core_text, rest) if p)
        return " ".join(p for p in (core_text, style) if p)

    chosen, rejected = join(cs, chosen_core), join(rs, rejected_core)
    prompt = [{"role": "user", "content": world.question(kind, subject)}]
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "gold_chosen": gold_reward(chosen),
        "gold_rejected": gold_reward(rejected),
        "chosen_correct": chosen_ok,
        "rejected_correct": rejected_ok,
    }


def knowledge_items(world: TinyWorld, rng: random.Random, n: int) -> list[dict]:
    """Multiple choice over every value of the attribute: recall of pretraining facts."""
    pairs = [(e, k) for e in world.entities for k in ATTRIBUTES]
    rng.shuffle(pairs)
    items = []
    for e, k in pairs[:n]:
        choices = list(ATTRIBUTES[k])
        items.append({"query": CLOZE[k].format(e=e), "choices": choices, "gold": choices.index(world.facts[e][k])})
    return items


def arithmetic_items(world: TinyWorld, rng: random.Random, n: int) -> list[dict]:
    """Sums never seen in the corpus, four choices: a skill, not a memory."""
    items = []
    sums = list(world.heldout_sums)
    rng.shuffle(sums)
    for a, b in sums[:n]:
        c = a + b
        distractors = sorted({c + d for d in (-2, -1, 1, 2, 3, 10) if c + d >= 0} - {c})
        choices = [c] + rng.sample(distractors, 3)
        rng.shuffle(choices)
        items.append({"query": f"{a} plus {b} is", "choices": [str(x) for x in choices], "gold": choices.index(c)})
    return items


@dataclass
class TinyWorldFiles:
    corpus_train: Path
    corpus_eval: Path
    sft_train: Path
    sft_eval: Path
    pref_train: Path
    pref_eval: Path
    eval_prompts: Path
    knowledge_items: Path
    arithmetic_items: Path
    world_json: Path
    tokenizer: Path


def world_files(out_dir: str | Path) -> TinyWorldFiles:
    d = Path(out_dir)
    return TinyWorldFiles(
        corpus_train=d / "corpus_train.jsonl",
        corpus_eval=d / "corpus_eval.jsonl",
        sft_train=d / "sft_train.jsonl",
        sft_eval=d / "sft_eval.jsonl",
        pref_train=d / "pref_train.jsonl",
        pref_eval=d / "pref_eval.jsonl",
        eval_prompts=d / "eval_prompts.jsonl",
        knowledge_items=d / "tasks" / "tiny_knowledge.jsonl",
        arithmetic_items=d / "tasks" / "tiny_arithmetic.jsonl",
        world_json=d / "world.json",
        tokenizer=d / "tokenizer",
    )


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")


def build_tiny_world(
    out_dir: str | Path,
    seed: int = 0,
    num_entities: int = 120,
    corpus_repeats: int = 4,
    max_operand: int = 20,
    heldout_sum_fraction: float = 0.2,
    sft_examples: int = 1500,
    pref_pairs: int = 1500,
    eval_prompts: int = 64,
    eval_items: int = 200,
    vocab_size: int = 512,
    heldout_fraction: float = 0.05,
) -> dict:
    """Write every file of the world into `out_dir` (same bytes for the same arguments).

    Returns counts for the manifest.
    """
    from taxfree.data.tokenizer import train_tokenizer

    world = make_world(seed, num_entities, max_operand, heldout_sum_fraction)
    files = world_files(out_dir)
    rng = random.Random(f"tiny-world-data-{seed}")

    lines = corpus_lines(world, rng)
    n_eval = max(1, int(len(lines) * heldout_fraction))
    eval_lines, train_unique = lines[:n_eval], lines[n_eval:]
    train_lines = []
    for _ in range(corpus_repeats):
        block = list(train_unique)
        rng.shuffle(block)
        train_lines.extend(block)
    _write_jsonl(files.corpus_train, [{"text": t} for t in train_lines])
    _write_jsonl(files.corpus_eval, [{"text": t} for t in eval_lines])

    def questions(n: int, sums: list[tuple[int, int]]):
        return [world.random_question(rng, sums) for _ in range(n)]

    sft_train = [conversation(world, rng, k, s) for k, s in questions(sft_examples, world.train_sums)]
    sft_eval = [conversation(world, rng, k, s) for k, s in questions(max(32, sft_examples // 20), world.train_sums)]
    pref_train = [preference_pair(world, rng, k, s) for k, s in questions(pref_pairs, world.train_sums)]
    pref_eval = [preference_pair(world, rng, k, s) for k, s in questions(max(64, pref_pairs // 10), world.train_sums)]
    prompts = []
    for k, s in questions(eval_prompts, world.train_sums):
        prompts.append({"prompt": [{"role": "user", "content": world.question(k, s)}], "answer": world.answer(k, s)})
    _write_jsonl(files.sft_train, sft_train)
    _write_jsonl(files.sft_eval, sft_eval)
    _write_jsonl(files.pref_train, pref_train)
    _write_jsonl(files.pref_eval, pref_eval)
    _write_jsonl(files.eval_prompts, prompts)
    know = knowledge_items(world, rng, eval_items)
    arith = arithmetic_items(world, rng, min(eval_items, len(world.heldout_sums)))
    _write_jsonl(files.knowledge_items, know)
    _write_jsonl(files.arithmetic_items, arith)
    files.world_json.write_text(json.dumps(asdict(world), indent=1, sort_keys=True) + "\n", encoding="utf-8")

    texts = train_unique + [m["content"] for r in sft_train for m in r["messages"]]
    texts += [r["chosen"][0]["content"] for r in pref_train] + [r["rejected"][0]["content"] for r in pref_train]
    train_tokenizer(texts, files.tokenizer, vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, chat_template=CHAT_TEMPLATE)

    pref_gold = [r["gold_chosen"] - r["gold_rejected"] for r in pref_train]
    return {
        "entities": len(world.entities),
        "corpus_train_lines": len(train_lines),
        "corpus_eval_lines": len(eval_lines),
        "sft_train": len(sft_train),
        "sft_eval": len(sft_eval),
        "pref_train": len(pref_train),
        "pref_eval": len(pref_eval),
        "eval_prompts": len(prompts),
        "knowledge_items": len(know),
        "arithmetic_items": len(arith),
        "pref_mean_gold_margin": sum(pref_gold) / len(pref_gold),
        "pref_chosen_correct": sum(r["chosen_correct"] for r in pref_train) / len(pref_train),
        "pref_rejected_correct": sum(r["rejected_correct"] for r in pref_train) / len(pref_train),
    }
