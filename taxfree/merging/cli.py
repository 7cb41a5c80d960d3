"""`taxfree merge`: average checkpoint directories from the command line.

Two-model form:  --sft DIR --aligned DIR --aligned-weight W [--blocks SPEC] [--embed-weight W]
                 [--head-weight W] --out DIR
N-model form:    --model DIR:WEIGHT --model DIR:WEIGHT ... [--normalize] --out DIR
Also runnable as `python -m taxfree.merging.cli ...`.
"""

from __future__ import annotations

import argparse
import json
import sys

from taxfree.errors import TaxfreeError
from taxfree.merging.checkpoint import parse_size
from taxfree.merging.merge import DEFAULT_MAX_SHARD_SIZE, merge_checkpoints
from taxfree.merging.plan import PartwiseWeights, parse_blocks


def add_merge_arguments(parser: argparse.ArgumentParser, out_required: bool = True) -> None:
    """The standalone merge options; `out_required=False` when the parser also takes a CONFIG
    (`taxfree merge CONFIG` runs the merge stage), and run_merge then asks for --out itself."""
    two = parser.add_argument_group("two models: theta = (1 - w) * sft + w * aligned")
    two.add_argument("--sft", metavar="DIR", help="SFT checkpoint directory (config, tokenizer copied from it)")
    two.add_argument("--aligned", metavar="DIR", help="aligned checkpoint directory")
    two.add_argument("--aligned-weight", type=float, metavar="W",
                     help="weight w of the aligned model, for every tensor not set by the options below")
    two.add_argument("--blocks", metavar="SPEC",
                     help='aligned weight per decoder-layer range, e.g. "0-10:0.4,11-20:0.3,21-:0.2" (inclusive)')
    two.add_argument("--embed-weight", type=float, metavar="W", help="aligned weight of the embeddings")
    two.add_argument("--head-weight", type=float, metavar="W",
                     help="aligned weight of the final norm and LM head (a tied head follows --embed-weight)")
    many = parser.add_argument_group("any number of models: theta = sum_i w_i * theta_i")
    many.add_argument("--model", action="append", metavar="DIR:WEIGHT", default=None,
                      help="a checkpoint and its weight; repeat for every model (config copied from the first)")
    many.add_argument("--normalize", action="store_true", help="divide the --model weights by their sum")
    parser.add_argument("--out", required=out_required, metavar="DIR",
                        help="output directory (must not exist or be empty)")
    parser.add_argument("--allow-extrapolation", action="store_true", help="allow weights outside [0, 1]")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, metavar="SIZE",
                        help=f"largest output shard, e.g. 5GB, 500MB (default {DEFAULT_MAX_SHARD_SIZE})")


def _parse_model(spec: str) -> tuple[str, float]:
    path, sep, weight = spec.rpartition(":")
    if not sep or not path:
        raise TaxfreeError(f"--model {spec!r}: expected DIR:WEIGHT")
    try:
        return path, float(weight)
    except ValueError:
        raise TaxfreeError(f"--model {spec!r}: weight {weight!r} is not a number") from None


def run_merge(args: argparse.Namespace) -> dict:
    """Validate the arguments, merge, and return the summary (also in OUT/merge.json)."""
    two_model = [o for o, v in (("--sft", args.sft), ("--aligned", args.aligned), ("--aligned-weight", args.aligned_weight),
                                ("--blocks", args.blocks), ("--embed-weight", args.embed_weight),
                                ("--head-weight", args.head_weight)) if v is not None]
    if args.out is None:
        raise TaxfreeError("merge: --out is required (or give a CONFIG to run its merge stage)")
    max_shard_size = parse_size(args.max_shard_size)
    common = dict(allow_extrapolation=args.allow_extrapolation, overwrite=args.force, max_shard_size=max_shard_size)
    if args.model:
        if two_model:
            raise TaxfreeError(f"{two_model[0]} cannot be combined with --model (use one form or the other)")
        models = [_parse_model(m) for m in args.model]
        return merge_checkpoints([m for m, _ in models], args.out, weights=[w for _, w in models],
                                 normalize=args.normalize, **common)
    if args.normalize:
        raise TaxfreeError("--normalize applies to the --model form only")
    for option, value in (("--sft", args.sft), ("--aligned", args.aligned)):
        if value is None:
            raise TaxfreeError(f"{option} is required (or give every model with --model DIR:WEIGHT)")
    partwise = PartwiseWeights(
        aligned_weight=args.aligned_weight,
        blocks=tuple(parse_blocks(args.blocks)) if args.blocks else (),
        embed_weight=args.embed_weight,
        head_weight=args.head_weight,
    )
    return merge_checkpoints([args.sft, args.aligned], args.out, partwise=partwise, **common)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="taxfree merge", description=__doc__.split("\n")[0])
    add_merge_arguments(parser)
    args = parser.parse_args(argv)
    try:
        summary = run_merge(args)
    except TaxfreeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
