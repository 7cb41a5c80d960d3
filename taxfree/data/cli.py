"""`taxfree data ...`: convert public data sets, validate record files, download from the hub.

    taxfree data convert SOURCE INPUT [INPUT ...] OUTPUT [--test-fraction F] [--seed S] [--force]
    taxfree data validate KIND FILE
    taxfree data probes OUTPUT [--seed S] [--force]
    taxfree data download NAME [--out data/NAME] [--limit N] [--test-fraction F] [--seed S] [--force]

An INPUT written `train=PATH` or `test=PATH` keeps that upstream split; plain paths are split
by prompt with --test-fraction. Also runs standalone: `python -m taxfree.data.cli ...`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from taxfree.errors import TaxfreeError


def add_data_subcommands(subparsers) -> None:
    """Add convert, validate and download to the subparsers of a `data` command.

    The caller creates them with dest="data_command" and dispatches with `run_data(args)`.
    """
    from taxfree.data.converters.files import DEFAULT_TEST_FRACTION, SPLITS
    from taxfree.data.converters.registry import SOURCES
    from taxfree.data.records import RECORD_KINDS

    convert = subparsers.add_parser(
        "convert",
        help="convert upstream files of a public data set into record JSONL splits",
        description="Convert upstream files into OUTPUT/<kind>_<split>.jsonl and OUTPUT/conversion.json.",
    )
    convert.add_argument("source", metavar="SOURCE", help=f"upstream data set of the inputs: {', '.join(SOURCES)}")
    convert.add_argument(
        "inputs", nargs="+", metavar="INPUT",
        help=f"upstream file (.jsonl, .jsonl.gz, .json, .parquet); prefix with {'= or '.join(SPLITS)}= to keep its split",
    )
    convert.add_argument("output", metavar="OUTPUT", help="output directory (must not exist or be empty)")
    _add_split_options(convert, DEFAULT_TEST_FRACTION)

    validate = subparsers.add_parser("validate", help="check a record file and name its first bad line")
    validate.add_argument("kind", metavar="KIND", help=f"record kind the file must hold: {', '.join(RECORD_KINDS)}")
    validate.add_argument("file", help="JSONL file")

    probes = subparsers.add_parser(
        "probes", help="write the offline general-ability probes (multiple choice) for evaluate.local_tasks",
    )
    probes.add_argument("output", metavar="OUTPUT", help="output directory (must not exist or be empty)")
    probes.add_argument("--seed", type=int, default=0, help="seed of the distractors and their order (default 0)")
    probes.add_argument("--force", action="store_true", help="replace a non-empty output directory")

    download = subparsers.add_parser("download", help="download a public data set with `datasets` and convert it")
    download.add_argument("name", metavar="NAME", help=f"data set to download: {', '.join(SOURCES)}")
    download.add_argument("--out", default=None, help="output directory (default: data/NAME)")
    download.add_argument("--limit", type=int, default=None, help="take only the first N rows of each upstream split")
    _add_split_options(download, DEFAULT_TEST_FRACTION)


def _add_split_options(parser: argparse.ArgumentParser, default_fraction: float) -> None:
    parser.add_argument(
        "--test-fraction", type=float, default=default_fraction,
        help=f"share of prompts held out when the input has no upstream split (default {default_fraction})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of that held-out choice (default 0)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")


def _parse_inputs(inputs: list[str]):
    """["train=a", "test=b"] -> {"train": [a], "test": [b]}; plain paths -> a list (split by prompt)."""
    from taxfree.data.converters.files import SPLITS

    labelled: dict[str, list[str]] = {}
    plain: list[str] = []
    for item in inputs:
        split, sep, path = item.partition("=")
        if sep and split in SPLITS and not Path(item).exists():
            labelled.setdefault(split, []).append(path)
        else:
            plain.append(item)
    if labelled and plain:
        raise TaxfreeError(
            f"{plain[0]}: give every input a split (train=PATH, test=PATH) or none of them"
        )
    return labelled or plain


def run_data(args: argparse.Namespace) -> int:
    """Run a parsed `data` command; raises TaxfreeError on bad input (the caller prints it)."""
    if args.data_command == "convert":
        from taxfree.data.converters.files import convert_file

        result = convert_file(
            args.source, _parse_inputs(args.inputs), args.output,
            test_fraction=args.test_fraction, seed=args.seed, overwrite=args.force,
        )
        print(result.describe(args.output))
        return 0
    if args.data_command == "validate":
        from taxfree.data.records import read_jsonl

        records = read_jsonl(args.file, kind=args.kind)
        print(f"{args.file}: {len(records)} {args.kind} records ok")
        return 0
    if args.data_command == "probes":
        from taxfree.data.probes import write_probes

        for name, n in write_probes(args.output, seed=args.seed, overwrite=args.force).items():
            print(f"  {name + '.jsonl':<26} {n:>6}")
        print(args.output)
        return 0
    if args.data_command == "download":
        from taxfree.data.converters.hub import download

        out = args.out or str(Path("data") / args.name)
        result = download(
            args.name, out, test_fraction=args.test_fraction, seed=args.seed, limit=args.limit, overwrite=args.force
        )
        print(result.describe(out))
        return 0
    raise TaxfreeError("data: choose an action: convert, validate, probes or download (see taxfree data --help)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="taxfree data", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="data_command", metavar="{convert,validate,probes,download}")
    commands.required = True
    add_data_subcommands(commands)
    args = parser.parse_args(argv)
    try:
        return run_data(args)
    except TaxfreeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
