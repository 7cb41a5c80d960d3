"""`merge`: post-hoc averaging of the SFT model with every aligned variant (docs/algorithms.md 3).

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
from dataclasses import dataclass, field

from taxfree.errors import ConfigError, TaxfreeError, nearest
from taxfree.merging import PartwiseWeights, merge_checkpoints, parse_blocks
from taxfree.merging.checkpoint import parse_size
from taxfree.pipeline import manifest as mf
from taxfree.pipeline.resolve import local_model_dir, sft_model_source
from taxfree.pipeline.rundir import run_variants
from taxfree.pipeline.schema import SectionError, require
from taxfree.pipeline.stages import Stage
from taxfree.stages.align import variant_names


@dataclass
class PartwiseMergeConfig:
    """One partwise point: an aligned weight per decoder-layer range (docs/algorithms.md 3)."""

    name: str | None = None  # the point is merge/<variant>-<name>; null = partwise<index>
    blocks: str = ""  # "0-1:0.8,2-3:0.5,4-:0.2" (inclusive ranges, FIRST-LAST:ALIGNED_WEIGHT)
    aligned_weight: float | None = None  # layers no range covers (null: every layer must be covered)
    embed_weight: float | None = None  # embeddings; null = aligned_weight
    head_weight: float | None = None  # final norm + LM head; null = aligned_weight

    def check(self):
        require(bool(self.blocks.strip()), "blocks", 'give the layer ranges, e.g. "0-1:0.8,2-:0.4"')
        try:
            parse_blocks(self.blocks)
        except Exception as e:  # TaxfreeError from the parser, reworded for the config
            raise SectionError(f"blocks: {str(e).removeprefix('--blocks: ')}") from None
        for k in ("embed_weight", "head_weight"):
            require(self.aligned_weight is not None or getattr(self, k) is not None, k,
                     "required when aligned_weight is null (nothing else says what it gets)")
        require(self.name is None or (bool(self.name) and "/" not in self.name and not self.name.startswith(".")),
                 "name", "must be a plain directory name")


@dataclass
class MergeStageConfig:
    """Post-hoc averaging of the SFT model with each aligned variant: `(1 - w) * sft + w * aligned`.

    One output per point: `merge/<variant>-w<w>/` for each aligned weight, and
    `merge/<variant>-<name>/` for each partwise setting.
    """

    aligned: list[str] | None = None  # align variants to merge (e.g. dpo-adamw); null = every one
    aligned_weights: list[float] = field(default_factory=lambda: [0.2, 0.4, 0.6, 0.8])
    partwise: list[PartwiseMergeConfig] = field(default_factory=list)
    allow_extrapolation: bool = False  # allow weights outside [0, 1]
    max_shard_size: str = "5GB"

    def check(self):
        require(len(self.aligned_weights) + len(self.partwise) >= 1, "aligned_weights",
                 "list at least one aligned weight (or a partwise setting)")
        require(len(set(self.aligned_weights)) == len(self.aligned_weights), "aligned_weights", "a weight is listed twice")
        for w in self.aligned_weights:
            require(self.allow_extrapolation or 0.0 <= w <= 1.0, "aligned_weights",
                     f"{w} is outside [0, 1] (set allow_extrapolation: true to extrapolate)")
        for i, p in enumerate(self.partwise):
            for k in ("aligned_weight", "embed_weight", "head_weight"):
                v = getattr(p, k)
                require(v is None or self.allow_extrapolation or 0.0 <= v <= 1.0, f"partwise[{i}].{k}",
                         f"{v} is outside [0, 1] (set allow_extrapolation: true to extrapolate)")
        names = self.point_names()
        require(len(set(names)) == len(names), "partwise", "two partwise settings have the same name")
        require(self.aligned is None or len(self.aligned) >= 1, "aligned", "list at least one variant (or null for all)")
        try:
            parse_size(self.max_shard_size)
        except Exception as e:
            raise SectionError(f"max_shard_size: {e}") from None

    def point_names(self) -> list[str]:
        return [f"partwise{i}" if p.name is None else p.name for i, p in enumerate(self.partwise)]


def check_aligned(cfg, stage: str) -> None:
    """`<stage>.aligned` names align variants of this config."""
    variants = variant_names(cfg)
    for v in getattr(cfg, stage).aligned or []:
        if v not in variants:
            raise ConfigError(f"{cfg.source}: {stage}.aligned: {v!r} is not an align variant of this config"
                              f"{nearest(v, variants)} (have: {', '.join(variants)})")


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
    for variant in variant_names(cfg, sec.aligned):
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


STAGE = Stage(
    name="merge",
    help="post-hoc averaging of SFT and aligned models (aligned-weight sweep, partwise)",
    config=MergeStageConfig,
    inputs=inputs,
    section=section,
    run=run,
    check=lambda cfg: check_aligned(cfg, "merge"),
    checkpoints={"sft": "causal_lm"},
    makes_models=True,
    keeps_variants=True,
)

