"""Reward against alignment tax: the tax arithmetic, the results table and the Pareto plot.

Input is the evaluate stage's `evaluate/results.json` (one row per model with its mean reward,
gold reward, PairRM win rate, benchmark scores in percent and, with `evaluate.judge`, MT-Bench and
AlpacaEval 2.0). The alignment tax of a model is
the SFT model's score minus its own, per benchmark and on the benchmark average, in percentage
points: positive = the model lost ability, negative = it gained. Output is `report.md`,
`results.json` (every number) and `pareto.png`, written atomically into the run directory.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from taxfree.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from taxfree.errors import TaxfreeError

EVAL_RESULTS = Path("evaluate") / "results.json"
KIND_LABELS = {"sft": "SFT", "align": "aligned", "merge": "merged", "ama": "AMA"}
# Judge columns (taxfree.eval.judge): (header, result key, digits, then the header, judged-count and
# failures keys of a "judged (failed)" column after it, or None).
JUDGE_COLUMNS = [("MT-Bench (1-10)", "mt_bench", 2, ("MT-Bench judged (failed)", "mt_bench_judged", "mt_bench_failures")),
                 ("AlpacaEval 2.0 LC (%)", "alpaca_eval_lc", 1, None),
                 ("AlpacaEval 2.0 WR (%)", "alpaca_eval_wr", 1,
                  ("AlpacaEval 2.0 judged (failed)", "alpaca_eval_judged", "alpaca_eval_failures"))]
# The y axis of the Pareto plot (`report.reward_axis`): result key -> label.
REWARD_AXES = {"reward": "reward-model score (mean)", "mt_bench": "MT-Bench score (1-10, judge)",
               "alpaca_eval_lc": "AlpacaEval 2.0 length-controlled win rate (%)",
               "alpaca_eval_wr": "AlpacaEval 2.0 win rate (%)"}


def benchmark_average(scores: dict[str, float]) -> float | None:
    """Unweighted mean of the counted scores (percent); None without benchmarks."""
    return sum(scores.values()) / len(scores) if scores else None


def alignment_tax(baseline_scores: dict[str, float], scores: dict[str, float]) -> tuple[dict[str, float], float | None]:
    """(tax per benchmark, tax on the average): baseline minus model, in percentage points."""
    if set(baseline_scores) != set(scores):
        missing = sorted(set(baseline_scores) ^ set(scores))
        raise TaxfreeError(f"alignment tax: the model and the SFT baseline were scored on different benchmarks ({', '.join(missing)})")
    per = {t: baseline_scores[t] - scores[t] for t in baseline_scores}
    avg_b, avg_m = benchmark_average(baseline_scores), benchmark_average(scores)
    return per, (avg_b - avg_m if avg_b is not None else None)


def read_eval_results(run_dir: str | Path) -> dict:
    path = Path(run_dir) / EVAL_RESULTS
    if not Path(run_dir).is_dir():
        raise TaxfreeError(f"{run_dir}: not a directory")
    if not path.is_file():
        raise TaxfreeError(f"{run_dir}: no evaluation results ({EVAL_RESULTS} is missing): run the evaluate stage first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise TaxfreeError(f"{path}: unreadable evaluation results ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), list) or not data["models"]:
        raise TaxfreeError(f"{path}: no models in the evaluation results")
    return data


def build_report(results: dict) -> dict:
    """Every number of the report: the evaluation rows plus their tax against the baseline."""
    rows = [dict(r) for r in results["models"]]
    ids = [r.get("id") for r in rows]
    baseline_id = results.get("baseline", "sft")
    if baseline_id not in ids:
        raise TaxfreeError(f"evaluation results: the baseline model {baseline_id!r} is missing (have: {', '.join(map(str, ids))})")
    base = rows[ids.index(baseline_id)]
    for r in rows:
        r.setdefault("scores", {})
        r["benchmark_average"] = benchmark_average(r["scores"])
        r["tax"], r["tax_average"] = alignment_tax(base["scores"], r["scores"])
    tasks = list(base["scores"])
    return {
        "experiment": results.get("experiment"),
        "baseline": baseline_id,
        "benchmarks": results.get("benchmarks", [{"task": t} for t in tasks]),
        "generation": results.get("generation", {}),
        "reward_model": results.get("reward_model"),
        "pairrm": results.get("pairrm"),
        "models": rows,
    }


def _fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def render_markdown(report: dict, title: str) -> str:
    """One table: model x reward, gold reward, PairRM win rate, each benchmark, average, tax."""
    rows = report["models"]
    tasks = list(rows[0]["scores"]) if rows else []
    cols: list[tuple[str, callable]] = [("model", lambda r: f"`{r['id']}`")]
    optional = [("reward (RM)", "reward", 3), ("gold reward", "gold_reward", 3), ("PairRM win rate vs SFT", "pairrm_win_rate", 3)]
    for header, key, d in optional:
        if any(r.get(key) is not None for r in rows):
            cols.append((header, lambda r, key=key, d=d: _fmt(r.get(key), d)))
    judged = [c for c in JUDGE_COLUMNS if any(r.get(c[1]) is not None or (c[3] and r.get(c[3][1]) is not None)
                                              for r in rows)]
    for header, key, d, counts in judged:
        cols.append((header, lambda r, key=key, d=d: _fmt(r.get(key), d)))
        if counts is not None:
            cols.append((counts[0], lambda r, n=counts[1], f=counts[2]: "–" if r.get(n) is None else f"{r[n]} ({r.get(f, 0)})"))
    for t in tasks:
        cols.append((f"{t} (%)", lambda r, t=t: _fmt(r["scores"].get(t), 1)))
    if tasks:
        cols.append(("average (%)", lambda r: _fmt(r["benchmark_average"], 1)))
        cols.append(("tax (pp)", lambda r: _fmt(r["tax_average"], 1)))
    lines = [f"# {title}", ""]
    lines.append("| " + " | ".join(h for h, _ in cols) + " |")
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        lines.append("| " + " | ".join(f(r) for _, f in cols) + " |")
    gen = report.get("generation") or {}
    lines += ["", "What the columns mean:", ""]
    how = "sampled" if gen.get("do_sample") else "greedy"
    n = gen.get("prompts")
    lines.append(f"- reward (RM): mean reward-model score of {how} responses to {n if n is not None else 'the'} held-out prompts"
                 + (f" (max {gen['max_new_tokens']} new tokens)" if gen.get("max_new_tokens") else "")
                 + (f"; reward model `{report['reward_model']}`" if report.get("reward_model") else "") + ".")
    if any(r.get("gold_reward") is not None for r in rows):
        lines.append("- gold reward: the tiny world's true preference (`taxfree.data.tiny_world.gold_reward`) on the same responses.")
    if any(r.get("pairrm_win_rate") is not None for r in rows):
        lines.append(f"- PairRM win rate: share of prompts where PairRM (`{report.get('pairrm')}`) prefers the model's response "
                     "to the SFT model's; ties count half (the SFT model itself scores 0.5).")
    else:
        lines.append("- PairRM win rate: not measured (set `evaluate.pairrm` to a PairRM-hf model).")
    judges = sorted({str((r.get("judge") or {}).get("model")) for r in rows if r.get("judge")})
    by = f" by `{', '.join(judges)}`" if judges else ""
    if any(c[1] == "mt_bench" for c in judged):
        lines.append(f"- MT-Bench: the mean of the judge's 1-10 ratings{by} of both turns' answers to its two-turn "
                     "questions (FastChat's single-answer prompts, reference-guided for math, reasoning, coding); "
                     "judged = turns rated, failed = replies without a readable rating (left out of the mean; "
                     "per category in results.json).")
    if any(c[1].startswith("alpaca_eval") for c in judged):
        lines.append(f"- AlpacaEval 2.0: win rate (WR) against the reference outputs{by} (pairwise prompt, order "
                     "randomised per item, ties half), and the length-controlled win rate (LC: a logistic GLM's "
                     "win rate at equal length); judged = instructions with a readable verdict, failed = without.")
    if tasks:
        metrics = ", ".join(f"{b['task']}: {b.get('metric', '?')}" for b in report.get("benchmarks", []))
        lines.append(f"- benchmarks in percent ({metrics}); average = unweighted mean.")
        lines.append(f"- tax = `{report['baseline']}` average minus the model's average, in percentage points "
                     "(positive: ability lost; per benchmark in results.json).")
    else:
        lines.append("- no benchmarks were configured, so there is no tax column (set `evaluate.benchmarks`).")
    return "\n".join(lines) + "\n"


def _variant_of(row: dict) -> str | None:
    """The align variant a model belongs to: itself for an aligned model, its source for a merge / AMA."""
    if row.get("kind") == "align":
        return row["id"].split("/", 1)[-1]
    return row.get("aligned")


def plot_pareto(report: dict, title: str, dpi: int = 150, reward_axis: str = "reward") -> bytes | None:
    """PNG bytes of reward (y) against benchmark average (x); None when there are no benchmarks.

    `reward_axis` picks the y axis: the reward model's score, or a judge metric (mt_bench,
    alpaca_eval_lc, alpaca_eval_wr: report.reward_axis).

    Each align variant has a colour: its merge sweep is a line from the SFT model (aligned
    weight 0) through the merge points to the aligned model (weight 1); AMA is a diamond.
    With gold rewards (tiny world) a second panel shows them on the same x axis.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if reward_axis not in REWARD_AXES:
        raise TaxfreeError(f"report: reward_axis {reward_axis!r} is not one of {', '.join(REWARD_AXES)}")
    rows = [r for r in report["models"] if r.get("benchmark_average") is not None and r.get(reward_axis) is not None]
    if not any(r["id"] == report["baseline"] for r in rows):  # the SFT point anchors every sweep
        return None
    panels = [(reward_axis, REWARD_AXES[reward_axis])]
    if all(r.get("gold_reward") is not None for r in rows):
        panels.append(("gold_reward", "gold reward (mean, tiny world)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 5.0), squeeze=False)
    base = next(r for r in rows if r["id"] == report["baseline"])
    variants = sorted({v for r in rows if (v := _variant_of(r)) is not None})
    colors = {v: plt.get_cmap("tab10")(i % 10) for i, v in enumerate(variants)}
    for ax, (key, ylabel) in zip(axes[0], panels):
        def xy(r):
            return r["benchmark_average"], r.get(key)

        for v in variants:
            aligned = [r for r in rows if r.get("kind") == "align" and _variant_of(r) == v]
            ours = [r for r in rows if r.get("kind") == "merge" and r.get("aligned") == v and r.get(key) is not None]
            merges = sorted((r for r in ours if r.get("aligned_weight") is not None), key=lambda r: r["aligned_weight"])
            for r in ours:  # partwise points: their own markers, off the sweep line
                if r.get("aligned_weight") is None:
                    ax.scatter(*xy(r), s=70, marker="s", color=colors[v], edgecolor="black", zorder=3,
                               label=f"{v}: partwise merge")
                    ax.annotate(r["id"].rsplit("/", 1)[-1].removeprefix(v + "-"), xy(r), textcoords="offset points",
                                xytext=(6, -10), fontsize=7, color=colors[v])
            if merges:
                sweep = [base] + merges + aligned
                ax.plot([xy(r)[0] for r in sweep], [xy(r)[1] for r in sweep], "-", color=colors[v], alpha=0.7, lw=1.5,
                        marker=".", ms=7, label=f"{v}: merge sweep")
                for r in merges:
                    if r.get("aligned_weight") is not None:
                        ax.annotate(f"w={r['aligned_weight']:g}", xy(r), textcoords="offset points", xytext=(4, -10),
                                    fontsize=7, color=colors[v])
            for r in aligned:
                ax.scatter(*xy(r), s=70, marker="o", color=colors[v], edgecolor="black", zorder=3, label=f"{v} (aligned)")
                ax.annotate(v, xy(r), textcoords="offset points", xytext=(6, 5), fontsize=8, color=colors[v])
            for r in rows:
                if r.get("kind") == "ama" and _variant_of(r) == v:
                    ax.scatter(*xy(r), s=90, marker="D", color=colors[v], edgecolor="black", zorder=3, label=f"{v}: AMA")
                    ax.annotate("AMA", xy(r), textcoords="offset points", xytext=(6, 5), fontsize=8, color=colors[v])
        for r in rows:  # AMA or merges without a known source variant
            if r.get("kind") in ("ama", "merge") and _variant_of(r) not in colors:
                ax.scatter(*xy(r), s=70, marker="D" if r["kind"] == "ama" else "s", color="gray", edgecolor="black",
                           zorder=3, label=f"{r['id']}")
        ax.scatter(*xy(base), s=200, marker="*", color="black", zorder=4, label=f"SFT ({base['id']}, tax 0)")
        ax.axvline(base["benchmark_average"], color="gray", ls=":", lw=1, label="SFT benchmark average (no tax)")
        ax.set_xlabel("benchmark average (%)   ← more alignment tax | less tax →")
        ax.set_ylabel(ylabel + "   (higher is better)")
        ax.grid(True, alpha=0.3)
        ax.margins(0.12)
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=8, loc="best", framealpha=0.85)
    fig.suptitle(title + "\n(upper right is best: high reward at little tax)", fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def write_report(run_dir: str | Path, title: str | None = None, dpi: int = 150, reward_axis: str = "reward") -> dict:
    """Write report.md, results.json and pareto.png into `run_dir`; returns their paths."""
    run_dir = Path(run_dir)
    report = build_report(read_eval_results(run_dir))
    title = title or f"{report.get('experiment') or run_dir.name}: reward vs alignment tax"
    paths = {"report": run_dir / "report.md", "results": run_dir / "results.json"}
    png = plot_pareto(report, title, dpi, reward_axis)
    md = render_markdown(report, title)
    if png is not None:
        paths["pareto"] = run_dir / "pareto.png"
        atomic_write_bytes(paths["pareto"], png)
        md += "\n![reward vs alignment tax](pareto.png)\n"
    else:
        (run_dir / "pareto.png").unlink(missing_ok=True)
        md += f"\nNo Pareto plot: it needs benchmark scores and a {reward_axis} for the models.\n"
    atomic_write_json(paths["results"], report)
    atomic_write_text(paths["report"], md)
    return paths
