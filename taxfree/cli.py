"""The `taxfree` command. Every user mistake ends as one `error: ...` line and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys

from taxfree import __version__
from taxfree.errors import TaxfreeError, disk_full_error, is_disk_full
from taxfree.pipeline.stages import STAGE_ORDER, all_stages


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: same one-line form, exit 2
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML (configs/experiments/*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set sft.lr=1e-5")


def _add_seeds_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", metavar="K,K,...",
                   help="run the stages from `seed_from` (align) on once per seed, e.g. --seeds 0,1,2 "
                        "(the config's `seeds:`); earlier stages run once and are shared")


def _seeds_override(text: str | None) -> list[str]:
    """`--seeds 0,1,2` as the override `seeds=[0, 1, 2]`."""
    if text is None:
        return []
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise TaxfreeError(f"--seeds {text}: expected comma-separated integers, e.g. --seeds 0,1,2") from None
    if not seeds:
        raise TaxfreeError(f"--seeds {text}: expected comma-separated integers, e.g. --seeds 0,1,2")
    return [f"seeds=[{', '.join(map(str, seeds))}]"]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="taxfree", description="Alignment that raises reward and keeps the alignment tax low.")
    parser.add_argument("--version", action="version", version=f"taxfree {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("validate", help="check a config (types, keys, paths) without running anything")
    _add_config_args(p)

    p = sub.add_parser("run", help="run the experiment's stages in order, skipping finished ones")
    _add_config_args(p)
    p.add_argument("--stages", help=f"comma-separated subset of: {','.join(STAGE_ORDER)}")
    p.add_argument("--force", action="store_true", help="re-run the selected stages even if finished")
    _add_seeds_arg(p)
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="with seeds: run N seeds side by side, each in a process of its own (default 1)")

    for declared in all_stages():
        if declared.name in _OWN_COMMANDS:
            continue
        p = sub.add_parser(declared.name, help=declared.help, description=declared.help,
                           epilog=_STAGE_EPILOGS.get(declared.name, lambda: None)(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_config_args(p)
        p.add_argument("--force", action="store_true", help="re-run even if finished")
        _add_seeds_arg(p)
        p.set_defaults(stage=declared.name)

    try:
        from taxfree.merging.cli import add_merge_arguments
    except ImportError:
        add_merge_arguments = None
    if add_merge_arguments is not None:
        p = sub.add_parser("merge", help="merge checkpoints (linear, partwise) with bounded memory; "
                                         "`taxfree merge CONFIG` runs the config's merge stage")
        p.add_argument("config", nargs="?", metavar="CONFIG",
                       help="experiment YAML: run its merge stage instead of merging the directories given")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config value (with CONFIG)")
        add_merge_arguments(p, out_required=False)
        p.set_defaults(stage="merge")

    try:
        from taxfree.data.cli import add_data_subcommands
    except ImportError:
        add_data_subcommands = None
    if add_data_subcommands is not None:
        p = sub.add_parser("data", help="convert, validate and download data sets")
        add_data_subcommands(p.add_subparsers(dest="data_command", metavar="ACTION", parser_class=_Parser))
    p = sub.add_parser("model", help="model file conversions (from-gguf)")
    model_sub = p.add_subparsers(dest="model_command", metavar="ACTION", parser_class=_Parser)
    q = model_sub.add_parser("from-gguf", help="convert a GGUF file into a safetensors checkpoint directory, once")
    q.add_argument("gguf", metavar="GGUF", help="the .gguf file (its tokenizer and chat template come along)")
    q.add_argument("out", metavar="OUT", help="output directory (must not exist or be empty)")
    q.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the de-quantized weights (default float32)")
    q.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    return parser


# Stages whose name is also a standalone command; `taxfree <name> CONFIG` runs the stage.
_OWN_COMMANDS = ("merge",)


def _align_epilog() -> str:
    """The methods and optimizers `align.methods` / `align.optimizers` take, from their registries."""
    from taxfree.losses.methods import methods
    from taxfree.optim.registry import optimizers

    lines = ["align.methods (taxfree.losses.methods):"]
    for m in methods().values():
        settings = ", ".join(p.name for p in m.params)
        lines.append(f"  {m.name:<10} {m.help} [{settings}]{' (needs the sample stage)' if m.needs_samples else ''}")
    lines.append("align.optimizers (taxfree.optim.registry):")
    for o in optimizers().values():
        extra = ", ".join(p.name for p in o.hyperparameters)
        lines.append(f"  {o.name:<10} {o.help}" + (f" [{extra}]" if extra else ""))
    return "\n".join(lines)


_STAGE_EPILOGS = {"align": _align_epilog}


def _parse_stages(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [s.strip() for s in text.split(",") if s.strip()]


def _report_run_dir(args) -> int:
    """`taxfree report RUN_DIR`: a directory is a finished run, not a config; no stage runs."""
    from taxfree.eval.report import write_report

    if args.overrides:
        raise TaxfreeError("report RUN_DIR: --set applies to a config, not to a run directory")
    paths = write_report(args.config)
    for p in paths.values():
        print(p)
    return 0


def _main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "merge" and args.config is None:
        from taxfree.merging.cli import run_merge

        if args.overrides:
            raise TaxfreeError("merge: --set applies to a config (taxfree merge CONFIG --set ...)")
        run_merge(args)
        return 0
    if args.command == "merge":
        given = [o for o, v in (("--sft", args.sft), ("--aligned", args.aligned), ("--model", args.model),
                                ("--out", args.out)) if v]
        if given:
            raise TaxfreeError(f"merge CONFIG runs the config's merge stage; {given[0]} belongs to the standalone form")
    if args.command == "data":
        from taxfree.data.cli import run_data

        return run_data(args) or 0

    if args.command == "model":
        if args.model_command != "from-gguf":
            raise TaxfreeError("model: choose an action: from-gguf (see taxfree model --help)")
        from taxfree.models.gguf import convert_gguf

        print(convert_gguf(args.gguf, args.out, dtype=args.dtype, overwrite=args.force))
        return 0

    if args.command == "report" and os.path.isdir(args.config):
        return _report_run_dir(args)

    from taxfree.pipeline.config import load_config

    cfg = load_config(args.config, args.overrides + _seeds_override(getattr(args, "seeds", None)))
    if cfg.models.trust_remote_code:
        from taxfree.models.load import warn_trust_remote_code

        warn_trust_remote_code(f"{args.config}: models.trust_remote_code")
    if args.command == "validate":
        from taxfree.pipeline.preflight import check_stages

        check_stages(cfg, cfg.enabled_stages(), skip_missing=True)  # opens data files and model directories
        stages = ", ".join(cfg.enabled_stages())
        print(f"ok: {args.config}: experiment {cfg.name!r}, stages {stages} -> {cfg.root}")
        return 0

    from taxfree.pipeline.runner import Runner

    jobs = getattr(args, "jobs", 1)
    if jobs < 1:
        raise TaxfreeError(f"--jobs {jobs}: must be >= 1")
    runner = Runner(cfg, force=args.force, argv=["taxfree", *argv], jobs=jobs)
    if args.command == "run":
        stages = _parse_stages(args.stages)
        runner.run(stages)
    else:
        runner.run([args.stage])
    print(f"results: {cfg.root}")
    return 0


def _close_progress_bars() -> None:
    """A stage stopped mid-loop leaves its tqdm bar open, the cursor at the end of its line:
    close it so the error starts a line of its own."""
    tqdm_module = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm_module, "tqdm", None), "_instances", None) or []):
        try:
            bar.close()
        except Exception:  # a bar in a bad state must not hide the error
            pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except TaxfreeError as e:
        _close_progress_bars()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if not is_disk_full(e):
            raise
        _close_progress_bars()
        print(f"error: {disk_full_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def console_main() -> None:
    """The `taxfree` script: like `python -m taxfree`, MPI ranks (mpirun) learn their place first."""
    from taxfree.distributed import discover_mpi

    try:
        discover_mpi()
    except TaxfreeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(main())
