"""OpenAI's summarize-from-feedback comparisons (TL;DR) -> summary preference pairs.

Upstream (openai/summarize_from_feedback, config "comparisons", CC BY 4.0 like the TL;DR posts):
one human comparison a row: info {id, post, title, subreddit, site, article}, summaries
[{text, policy, note}, {text, policy, note}], choice (0 or 1, the preferred summary), worker,
batch, split, extra {confidence}. The raw release stores the same objects as JSON lines.
The prompt is EXO's format, "SUBREDDIT: r/{subreddit}\\nTITLE: {title}\\nPOST: {post}\\nTL;DR:", and
each summary becomes " " + its stripped text. CNN/DM rows (an article, no Reddit post) and pairs of
identical summaries are skipped. Records keep "post_id" (= info.id; many comparisons share a post).
"""

from __future__ import annotations

from taxfree.data.converters._common import SkipRecord, UpstreamSchemaError, field, pref_outputs

NAME = "tldr"
HUB_ID = "openai/summarize_from_feedback"
HUB_CONFIG = "comparisons"
HUB_SPLITS = {"train": "train", "validation": "test"}


def tldr_prompt(subreddit: str, title: str, post: str) -> str:
    return f"SUBREDDIT: r/{subreddit}\nTITLE: {title.strip()}\nPOST: {post.strip()}\nTL;DR:"


def convert(row: dict) -> dict[str, list[dict]]:
    info = field(row, "info", dict, NAME)
    summaries = field(row, "summaries", list, NAME)
    choice = field(row, "choice", int, NAME)
    post = field(info, "post", str, f"{NAME} info", allow_none=True)
    if post is None:
        raise SkipRecord("not a Reddit post (CNN/DM article)")
    title = field(info, "title", str, f"{NAME} info")
    subreddit = field(info, "subreddit", str, f"{NAME} info")
    post_id = field(info, "id", str, f"{NAME} info")
    if len(summaries) != 2:
        raise UpstreamSchemaError(f"{NAME}: 'summaries' must hold 2 summaries, got {len(summaries)}")
    texts = [field(s, "text", str, f"{NAME} summaries[{i}]") for i, s in enumerate(summaries)]
    if choice not in (0, 1):
        raise UpstreamSchemaError(f"{NAME}: 'choice' must be 0 or 1, got {choice}")
    chosen, rejected = " " + texts[choice].strip(), " " + texts[1 - choice].strip()
    if chosen == rejected:
        raise SkipRecord("chosen and rejected summaries are identical")
    pref = {"prompt": tldr_prompt(subreddit, title, post), "chosen": chosen, "rejected": rejected, "post_id": post_id}
    return pref_outputs(pref)
