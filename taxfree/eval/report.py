"""Reward against alignment tax: the tax arithmetic, the results table and the Pareto plot.

Input is the evaluate stage's `evaluate/results.json` (one row per model with its mean reward,
gold reward, PairRM win rate, benchmark scores in percent and, with `evaluate.judge`, MT-Bench and
AlpacaEval 2.0). The alignment tax of a model is
the SFT model's score minus its own, per benchmark and on the benchmark average, in percentage
points: positive = the model lost ability, negative = it gained. Output is `report.md`,
`results.json` (every number) and `pareto.png`, written atomically into the run directory.

Every number carries a 95% interval (taxfree.eval.stats): with several seeds (each seed's
`seed<k>/evaluate/results.json`) Student's t over the seeds' values, with one seed a bootstrap
over the held-out prompts for the reward and gold reward. The Comparisons section asks the
papers' questions of the run (taxfree.eval.comparisons).
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


# Numbers a model row may carry, aggregated over seeds (scores and tax per task too).
METRICS = ("reward", "gold_reward", "pairrm_win_rate", "mt_bench", "alpaca_eval_lc", "alpaca_eval_wr",
           "benchmark_average", "tax_average")
ITEM_METRICS = {"reward": "reward", "gold_reward": "gold_reward"}  # metric -> its key in responses.jsonl


def _metric_values(row: dict) -> dict[str, float]:
    out = {m: row[m] for m in METRICS if isinstance(row.get(m), (int, float)) and not isinstance(row.get(m), bool)}
    out.update({f"scores/{t}": v for t, v in (row.get("scores") or {}).items() if v is not None})
    out.update({f"tax/{t}": v for t, v in (row.get("tax") or {}).items() if v is not None})
    return out


def read_items(evaluate_dir: Path, model_id: str) -> dict[str, list[float]]:
    """Per-prompt values of a model (reward, gold reward) from its responses.jsonl; {} if absent."""
    path = Path(evaluate_dir) / model_id / "responses.jsonl"
    if not path.is_file():
        return {}
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {metric: [r[key] for r in lines if isinstance(r.get(key), (int, float))]
            for metric, key in ITEM_METRICS.items() if all(isinstance(r.get(key), (int, float)) for r in lines) and lines}


def aggregate(reports: dict[int, dict], items: dict[str, dict[str, list[float]]] | None = None) -> dict:
    """One report from each seed's (build_report): every model's metrics as their mean over the
    seeds, with `per_seed` values and 95% `intervals` (t over seeds; with one seed a bootstrap over
    `items[model_id][metric]` where given)."""
    from taxfree.eval.stats import bootstrap_interval, t_interval

    seeds = list(reports)
    first = reports[seeds[0]]
    by_seed = {k: {r["id"]: r for r in rep["models"]} for k, rep in reports.items()}
    rows = []
    for row in first["models"]:
        mid = row["id"]
        present = [k for k in seeds if mid in by_seed[k]]
        values: dict[str, dict[int, float]] = {}
        for k in present:
            for metric, v in _metric_values(by_seed[k][mid]).items():
                values.setdefault(metric, {})[k] = v
        out = dict(row)
        out["per_seed"] = {m: {str(k): v for k, v in vs.items()} for m, vs in values.items()}
        out["intervals"] = {}
        for metric, vs in values.items():
            if len(vs) >= 2:
                interval = t_interval(list(vs.values()))
            elif items and items.get(mid, {}).get(metric):
                interval = bootstrap_interval(items[mid][metric])
            else:
                interval = t_interval(list(vs.values()))
            out["intervals"][metric] = interval.to_dict()
            mean = interval.estimate if interval.kind != "bootstrap" else sum(vs.values()) / len(vs)
            if "/" in metric:
                group, task = metric.split("/", 1)
                out.setdefault(group, {})
                out[group] = {**out[group], task: mean}
            else:
                out[metric] = mean
        rows.append(out)
    return {**first, "seeds": seeds, "models": rows}


def _half(r: dict, key: str) -> float | None:
    iv = (r.get("intervals") or {}).get(key)
    if not iv or iv.get("kind") == "none":
        return None
    return max(iv["estimate"] - iv["low"], iv["high"] - iv["estimate"])


def _cell(r: dict, key: str, value, digits: int) -> str:
    """`value ±h` where the 95% interval's half-width h is known."""
    half = _half(r, key)
    return _fmt(value, digits) + (f" ±{half:.{digits}f}" if half is not None and value is not None else "")


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
            cols.append((header, lambda r, key=key, d=d: _cell(r, key, r.get(key), d)))
    judged = [c for c in JUDGE_COLUMNS if any(r.get(c[1]) is not None or (c[3] and r.get(c[3][1]) is not None)
                                              for r in rows)]
    for header, key, d, counts in judged:
        cols.append((header, lambda r, key=key, d=d: _cell(r, key, r.get(key), d)))
        if counts is not None:
            cols.append((counts[0], lambda r, n=counts[1], f=counts[2]: "–" if r.get(n) is None else f"{r[n]} ({r.get(f, 0)})"))
    for t in tasks:
        cols.append((f"{t} (%)", lambda r, t=t: _cell(r, f"scores/{t}", r["scores"].get(t), 1)))
    if tasks:
        cols.append(("average (%)", lambda r: _cell(r, "benchmark_average", r["benchmark_average"], 1)))
        cols.append(("tax (pp)", lambda r: _cell(r, "tax_average", r["tax_average"], 1)))
    lines = [f"# {title}", ""]
    lines.append("| " + " | ".join(h for h, _ in cols) + " |")
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        lines.append("| " + " | ".join(f(r) for _, f in cols) + " |")
    gen = report.get("generation") or {}
    seeds = report.get("seeds") or []
    lines += ["", "What the columns mean:", ""]
    if len(seeds) >= 2:
        lines.append(f"- each number is the mean over {len(seeds)} seeds ({', '.join(map(str, seeds))}); "
                     "± is the half-width of its 95% interval (Student's t over the seeds; per seed in results.json).")
    elif any(r.get("intervals") for r in rows):
        lines.append("- one seed: ± is the half-width of a 95% bootstrap interval over the held-out prompts "
                     "(reward, gold reward); numbers without ± have no interval from one run.")
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
    if "comparisons" in report:
        lines += ["", *render_comparisons(report["comparisons"], len(seeds))]
    return "\n".join(lines) + "\n"


def render_comparisons(comparisons: list[dict], seeds: int) -> list[str]:
    """The Comparisons section: each question, the estimate, its 95% interval, n and a verdict."""
    lines = ["## Comparisons", ""]
    if not comparisons:
        return lines + ["No comparison applies: the run has no pair of variants (another optimizer or method "
                        "beside adamw / dpo) and no AMA or partwise model with a sweep.", ""]
    lines += ["| question | estimate | 95% interval | n | p | verdict |", "|---|---|---|---|---|---|"]
    for c in comparisons:
        d = c["difference"]
        interval = "–" if d["kind"] == "none" else f"[{d['low']:+.3f}, {d['high']:+.3f}]"
        p = "–" if c.get("p_value") is None else f"{c['p_value']:.3g}"
        lines.append(f"| {c['question']} | {d['estimate']:+.3f} | {interval} | {c['n']} | {p} | {c['verdict']} |")
    lines.append("")
    lines.append("Each difference is computed per seed and tested as pairs over the seeds (Student's t); "
                 "\"better\" / \"worse\" means the 95% interval excludes zero. "
                 + ("With one seed no verdict is possible: run more seeds (`--seeds 0,1,2`)."
                    if seeds < 2 else ""))
    return lines


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

        def bars(r, color):
            """The point's 95% intervals as error bars (none without intervals)."""
            xerr, yerr = _half(r, "benchmark_average"), _half(r, key)
            if xerr is not None or yerr is not None:
                ax.errorbar(*xy(r), xerr=xerr, yerr=yerr, fmt="none", ecolor=color, alpha=0.6, capsize=2, lw=1)

        for v in variants:
            aligned = [r for r in rows if r.get("kind") == "align" and _variant_of(r) == v]
            ours = [r for r in rows if r.get("kind") == "merge" and r.get("aligned") == v and r.get(key) is not None]
            merges = sorted((r for r in ours if r.get("aligned_weight") is not None), key=lambda r: r["aligned_weight"])
            for r in ours:  # partwise points: their own markers, off the sweep line
                if r.get("aligned_weight") is None:
                    ax.scatter(*xy(r), s=70, marker="s", color=colors[v], edgecolor="black", zorder=3,
                               label=f"{v}: partwise merge")
                    bars(r, colors[v])
                    ax.annotate(r["id"].rsplit("/", 1)[-1].removeprefix(v + "-"), xy(r), textcoords="offset points",
                                xytext=(6, -10), fontsize=7, color=colors[v])
            if merges:
                sweep = [base] + merges + aligned
                ax.plot([xy(r)[0] for r in sweep], [xy(r)[1] for r in sweep], "-", color=colors[v], alpha=0.7, lw=1.5,
                        marker=".", ms=7, label=f"{v}: merge sweep" + (" (mean, 95% band)" if _half(base, key) or
                                                                       any(_half(r, key) for r in sweep) else ""))
                halves = [_half(r, key) or 0.0 for r in sweep]
                if any(halves):  # the band follows the sweep: its upper edge out, its lower edge back
                    xs = [xy(r)[0] for r in sweep]
                    ax.fill(xs + xs[::-1], [xy(r)[1] + h for r, h in zip(sweep, halves)]
                            + [xy(r)[1] - h for r, h in zip(sweep[::-1], halves[::-1])],
                            color=colors[v], alpha=0.12, lw=0)
                for r in merges:
                    if r.get("aligned_weight") is not None:
                        ax.annotate(f"w={r['aligned_weight']:g}", xy(r), textcoords="offset points", xytext=(4, -10),
                                    fontsize=7, color=colors[v])
            for r in aligned:
                ax.scatter(*xy(r), s=70, marker="o", color=colors[v], edgecolor="black", zorder=3, label=f"{v} (aligned)")
                bars(r, colors[v])
                ax.annotate(v, xy(r), textcoords="offset points", xytext=(6, 5), fontsize=8, color=colors[v])
            for r in rows:
                if r.get("kind") == "ama" and _variant_of(r) == v:
                    ax.scatter(*xy(r), s=90, marker="D", color=colors[v], edgecolor="black", zorder=3, label=f"{v}: AMA")
                    bars(r, colors[v])
                    ax.annotate("AMA", xy(r), textcoords="offset points", xytext=(6, 5), fontsize=8, color=colors[v])
        for r in rows:  # AMA or merges without a known source variant
            if r.get("kind") in ("ama", "merge") and _variant_of(r) not in colors:
                ax.scatter(*xy(r), s=70, marker="D" if r["kind"] == "ama" else "s", color="gray", edgecolor="black",
                           zorder=3, label=f"{r['id']}")
        ax.scatter(*xy(base), s=200, marker="*", color="black", zorder=4, label=f"SFT ({base['id']}, tax 0)")
        bars(base, "black")
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


def seed_results(run_dir: Path) -> dict[int, Path]:
    """seed -> its evaluate results in a run made with `seeds:` (runs/<name>/seed<k>/evaluate/)."""
    out = {}
    for d in sorted(Path(run_dir).glob("seed*")):
        tail = d.name.removeprefix("seed")
        if d.is_dir() and tail.isdigit() and (d / EVAL_RESULTS).is_file():
            out[int(tail)] = d
    return dict(sorted(out.items()))


def gather(run_dir: Path, seeds: list[int] | None = None) -> dict:
    """The report of a run: one seed's results (runs/<name>/evaluate/), or every seed's aggregated
    (`seeds`, or the seed<k>/ directories found when there is no runs/<name>/evaluate/)."""
    run_dir = Path(run_dir)
    found = seed_results(run_dir)
    if seeds is None and not (run_dir / EVAL_RESULTS).is_file() and found:
        seeds = list(found)
    if seeds:
        missing = [k for k in seeds if k not in found]
        if missing:
            raise TaxfreeError(f"{run_dir}: no evaluation results for seed {missing[0]} "
                               f"(seed{missing[0]}/{EVAL_RESULTS} is missing): run the evaluate stage for it first")
        dirs = {k: found[k] for k in seeds}
    else:
        dirs = {None: run_dir}
    results = {k: read_eval_results(d) for k, d in dirs.items()}
    # One run without seed directories: its seed is recorded in its results (0 if older).
    reports = {(k if k is not None else int(r.get("seed", 0))): build_report(r) for k, r in results.items()}
    items = None
    if len(dirs) == 1:
        d = next(iter(dirs.values())) / "evaluate"
        items = {r["id"]: read_items(d, r["id"]) for r in next(iter(reports.values()))["models"]}
    report = aggregate(reports, items)
    from taxfree.eval.comparisons import compare

    report["comparisons"] = compare({k: r for k, r in reports.items()})
    return report


def write_report(run_dir: str | Path, title: str | None = None, dpi: int = 150, reward_axis: str = "reward",
                 seeds: list[int] | None = None) -> dict:
    """Write report.md, results.json and pareto.png into `run_dir`; returns their paths."""
    run_dir = Path(run_dir)
    report = gather(run_dir, seeds)
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
