"""`merge`: post-hoc averaging of the SFT model with every aligned variant (ALGORITHMS.md 3).

For each align variant (or those `merge.aligned` lists) one point per aligned weight,
`merge/<variant>-w<w>/`, holding `(1 - w) * sft + w * aligned`, and one per partwise setting,
`merge/<variant>-<name>/`. Each point is a variant of this stage with its own manifest, whose
config names the align variant it came from (`aligned`) and its `aligned_weight` (null for a
partwise point): the evaluate stage and the report draw the reward-vs-tax sweep from them.
A point depends on its aligned model's own run id, so re-training one align variant re-merges
only that variant's points. The merge itself is `taxfree.merging.merge_checkpoints` (streaming).
"""

from __future__ import annotations

import dataclasses
import json

from taxfree.errors import TaxfreeError
from taxfree.merging import PartwiseWeights, merge_checkpoints, parse_blocks
from taxfree.merging.checkpoint import parse_size
from taxfree.pipeline import manifest as mf
from taxfree.pipeline.resolve import local_model_dir, sft_model_source
from taxfree.pipeline.runner import run_variants

KEEPS_VARIANTS = True


def inputs(cfg) -> dict:
    return {"sft": sft_model_source(cfg), "align": ("align", str(cfg.stage_dir("align")))}


def section(cfg) -> dict:
    return {"merge": dataclasses.asdict(cfg.merge)}


def weight_label(w: float) -> str:
    """0.4 -> 'w0.4', 1e-3 -> 'w0.001': short, exact enough to be unique for the listed weights."""
    return f"w{w:g}"


def aligned_model_dir(cfg, variant: str) -> str:
    return str(cfg.stage_dir("align") / variant / "model")


def aligned_model(cfg, variant: str) -> tuple[str, str]:
    """(model directory, run_id) of a finished align variant; an error naming the command otherwise."""
    vdir = cfg.stage_dir("align") / variant
    m = mf.read_manifest(vdir)
    if m is None or not (vdir / "model" / "config.json").is_file():
        raise TaxfreeError(f"align variant {variant} has not finished ({vdir}): run `taxfree run {cfg.source} --stages align`")
    return aligned_model_dir(cfg, variant), m["run_id"]


def points(cfg) -> dict[str, dict]:
    """Every merge point: name -> the config that shapes it (recorded in its manifest)."""
    sec = cfg.merge
    out = {}
    for variant in cfg.align_variants(sec.aligned):
        _, run_id = aligned_model(cfg, variant)
        for w in sec.aligned_weights:
            out[f"{variant}-{weight_label(w)}"] = {
                "aligned": variant, "aligned_run_id": run_id, "mode": "linear", "aligned_weight": w,
                "allow_extrapolation": sec.allow_extrapolation, "max_shard_size": sec.max_shard_size}
        for name, p in zip(sec.point_names(), sec.partwise):
            out[f"{variant}-{name}"] = {
                "aligned": variant, "aligned_run_id": run_id, "mode": "partwise", "aligned_weight": None,
                "partwise": dataclasses.asdict(p) | {"name": name},
                "allow_extrapolation": sec.allow_extrapolation, "max_shard_size": sec.max_shard_size}
    return out


def partwise_weights(point: dict) -> PartwiseWeights:
    if point["mode"] == "linear":
        return PartwiseWeights(aligned_weight=point["aligned_weight"])
    p = point["partwise"]
    return PartwiseWeights(aligned_weight=p["aligned_weight"], blocks=tuple(parse_blocks(p["blocks"])),
                           embed_weight=p["embed_weight"], head_weight=p["head_weight"])


def merge_point(cfg, point: dict, vdir) -> dict:
    _, sft_ref = sft_model_source(cfg)
    sft_dir = local_model_dir(sft_ref)
    aligned_dir = aligned_model_dir(cfg, point["aligned"])  # checked finished when the points were listed
    out = vdir / "model"
    if (out / "config.json").is_file() and (out / "merge.json").is_file():
        # A resumed point whose model was renamed into place before the kill: the write is atomic.
        summary = json.loads((out / "merge.json").read_text())
    else:
        summary = merge_checkpoints([sft_dir, aligned_dir], out, partwise=partwise_weights(point),
                                    allow_extrapolation=point["allow_extrapolation"], overwrite=True,
                                    max_shard_size=parse_size(point["max_shard_size"]))
    metrics = {"aligned": point["aligned"], "mode": point["mode"], "aligned_weight": point["aligned_weight"],
               "bytes": summary.get("bytes"), "tensors": summary.get("tensors"), "merge_seconds": summary.get("seconds")}
    layers = [w for w in summary.get("aligned_weight_by_layer") or [] if w is not None]
    if layers:
        metrics["mean_layer_aligned_weight"] = sum(layers) / len(layers)
    return metrics


def run(ctx) -> dict:
    cfg = ctx.cfg
    table = points(cfg)
    results = run_variants(ctx, table, lambda name, vdir, resumed: merge_point(cfg, table[name], vdir),
                           inputs_of=lambda name: ["sft"])
    return {"points": len(results), "aligned_variants": len({p["aligned"] for p in table.values()})}
