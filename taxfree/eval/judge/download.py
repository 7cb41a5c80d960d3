"""Fetch the judge benchmarks' data from where their authors publish them, unchanged.

    python -m taxfree.eval.judge.download mt_bench    [--out data/mt_bench]    [--force]
    python -m taxfree.eval.judge.download alpaca_eval [--out data/alpaca_eval] [--force]
    (or: scripts/download_data.sh mt_bench | alpaca_eval)

- mt_bench: FastChat's question.jsonl, judge_prompts.jsonl and reference_answer/gpt-4.jsonl from
  the lm-sys/FastChat repository at a fixed commit, checked against their sha256;
- alpaca_eval: AlpacaEval 2.0's reference outputs (GPT-4 Turbo's, `alpaca_eval_gpt4_baseline.json`)
  from the tatsu-lab/alpaca_eval data set on the Hugging Face hub, saved as alpaca_eval.json.

The files are written into a fresh directory that replaces OUT only when every file arrived and
reads back as its benchmark expects. Needs the network.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

from taxfree.atomic import atomic_dir
from taxfree.errors import TaxfreeError

FASTCHAT_COMMIT = "0e6d3e4beaab66f4d3f93db72541a4abab8af28d"
FASTCHAT_DATA = f"https://raw.githubusercontent.com/lm-sys/FastChat/{FASTCHAT_COMMIT}/fastchat/llm_judge/data/"
# file in data/mt_bench/ -> (path below FastChat's llm_judge/data/, sha256 at FASTCHAT_COMMIT)
MT_BENCH_FILES = {
    "question.jsonl": ("mt_bench/question.jsonl", "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7"),
    "judge_prompts.jsonl": ("judge_prompts.jsonl", "fd283293406d024f44c174b094ef48031d0687a4682fd3a56b29b138f80281b6"),
    "reference_answer/gpt-4.jsonl": ("mt_bench/reference_answer/gpt-4.jsonl",
                                     "f957a5bc977badb66885ec970e6cd08527845780313f0995764260e5777b9b3f"),
}
ALPACA_EVAL_REPO = "tatsu-lab/alpaca_eval"
ALPACA_EVAL_FILE = "alpaca_eval_gpt4_baseline.json"  # AlpacaEval 2.0's reference outputs
SOURCES = ("mt_bench", "alpaca_eval")


def _fetch(url: str, timeout: float = 60.0) -> bytes:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read()
    except (urllib.error.URLError, OSError) as e:
        raise TaxfreeError(f"{url}: download failed ({getattr(e, 'reason', e)})") from None


def download_mt_bench(out: Path) -> Path:
    """data/mt_bench/{question.jsonl, judge_prompts.jsonl, reference_answer/gpt-4.jsonl}."""
    for name, (upstream, sha) in MT_BENCH_FILES.items():
        data = _fetch(FASTCHAT_DATA + upstream)
        got = hashlib.sha256(data).hexdigest()
        if got != sha:
            raise TaxfreeError(f"{FASTCHAT_DATA + upstream}: sha256 {got}, expected {sha} (a changed upstream file)")
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    return out


def download_alpaca_eval(out: Path) -> Path:
    """data/alpaca_eval/alpaca_eval.json: the 805 instructions with AlpacaEval 2.0's reference outputs."""
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(repo_id=ALPACA_EVAL_REPO, filename=ALPACA_EVAL_FILE, repo_type="dataset")
    except Exception as e:  # the hub's errors: offline, not found, refused
        raise TaxfreeError(f"{ALPACA_EVAL_REPO}/{ALPACA_EVAL_FILE}: download failed ({type(e).__name__}: {e})") from None
    shutil.copyfile(path, out / "alpaca_eval.json")
    return out


def download(name: str, out: str | Path, overwrite: bool = False) -> dict[str, int]:
    """Download `name` into `out` (its benchmark's directory); returns the item counts read back."""
    from taxfree.eval.judge.data import check_data, load_alpaca_eval, load_mt_bench

    if name not in SOURCES:
        raise TaxfreeError(f"judge data: unknown name {name!r} (have: {', '.join(SOURCES)})")
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        # The loaders read <data_dir>/<name>/...: check the new files through a view of that layout.
        view = tmp / "_check"
        (view).mkdir()
        (download_mt_bench if name == "mt_bench" else download_alpaca_eval)(tmp)
        (view / name).symlink_to(tmp, target_is_directory=True)
        if name == "mt_bench":
            check_data(["mt_bench"], view)
            counts = {"questions": len(load_mt_bench(view))}
        else:
            counts = {"instructions": len(load_alpaca_eval(view))}
        shutil.rmtree(view)
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m taxfree.eval.judge.download", description=__doc__.splitlines()[0])
    p.add_argument("name", choices=SOURCES)
    p.add_argument("--out", default=None, help="output directory (default: data/NAME)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    args = p.parse_args(argv)
    out = args.out or str(Path("data") / args.name)
    try:
        counts = download(args.name, out, overwrite=args.force)
    except TaxfreeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{out}: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
