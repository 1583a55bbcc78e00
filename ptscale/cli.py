"""``ptscale``: train (the same entry as launchers/train.py), print a resolved recipe (``config``), score saved
predictions, evaluate a saved run (``eval``), analyse its representation spectra (``analyze``), tabulate runs
(``report``), export weights (``export``) and run the paper's grid of methods x seeds (``grid``).

A user's mistake is one line and an exit code, never a traceback (``--debug`` shows it): 2 for a recipe, an
option or a directory, 3 for unreadable data or files, 1 when training stopped itself (non-finite values),
128 + the signal for an interrupt. The recipe is read and validated before torch is imported.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from pathlib import Path

import yaml

from ptscale import console
from ptscale.console import Verbosity

log = logging.getLogger("ptscale")


def add_train_args(p: argparse.ArgumentParser) -> None:
    from ptscale.config import DEFAULT_DS

    p.add_argument("--recipe", default=None, help="recipe YAML (default: the embedded PT-LoRA recipe)")
    p.add_argument("--ds", default=str(DEFAULT_DS), help="DeepSpeed JSON; 'auto' values come from the recipe")
    p.add_argument("--resume", default=None, metavar="auto|RUN_DIR|CKPT_DIR",
                   help="continue a run from its newest complete checkpoint (auto: the named run_name, or the newest "
                        "run under output_dir) or from a given run or checkpoint directory; the run's saved recipe "
                        "is used, and overrides may change only eval/checkpoint/logging settings")
    p.add_argument("--print-config", action="store_true", help="print the fully resolved recipe and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything (recipe, DeepSpeed config, backbone, data, the model on the meta device) "
                        "and exit without training or writing a run directory")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides, e.g. methods.lora.lr=1e-4")


def _peek(recipe: str | None, overrides: list[str], key: str, default: str | None) -> str | None:
    """A top-level value (output_dir, run_name) from the overrides or the recipe file, before validation: a
    resume finds its run directory first and then validates against the recipe saved there."""
    for item in reversed(overrides):
        if item.startswith(f"{key}="):
            return item.split("=", 1)[1] or None
    if recipe and Path(recipe).is_file():
        try:
            raw = yaml.safe_load(Path(recipe).read_text())
        except yaml.YAMLError:
            raw = None
        if isinstance(raw, dict) and key in raw:
            return raw[key]
    return default


def resolve_train_config(args: argparse.Namespace):
    """(recipe, resume): the command's recipe, or on --resume the run's saved one with allowed overrides."""
    from ptscale.config import load_recipe
    from ptscale.rundir import check_output_dir, check_run_name_free, find_resume, resumed_recipe

    if not args.resume:
        cfg = load_recipe(args.recipe, args.overrides)
        check_output_dir(cfg)
        check_run_name_free(cfg)
        return cfg, None
    output_dir = _peek(args.recipe, args.overrides, "output_dir", "runs")
    run_name = _peek(args.recipe, args.overrides, "run_name", None)
    resume = find_resume(args.resume, output_dir, run_name)
    if resume is None:
        where = f"{output_dir}/{run_name}" if run_name else f"any run under {output_dir}"
        print(f"ptscale: --resume auto: no complete checkpoint in {where}; starting a fresh run", file=sys.stderr)
        return load_recipe(args.recipe, args.overrides), None
    if resume.checkpoint is None:
        print(f"ptscale: --resume: {resume.run_dir} has no complete checkpoint yet; starting it again from the "
              "beginning with its saved recipe", file=sys.stderr)
    return resumed_recipe(resume.run_dir, args.recipe, args.overrides), resume


def launch_command(args: argparse.Namespace) -> str:
    """How this run was started, as far as a rank can tell: the resume hint repeats it."""
    world = os.environ.get("WORLD_SIZE", "1")
    if "TORCHELASTIC_RUN_ID" in os.environ:
        launcher = f"torchrun --nproc_per_node {os.environ.get('LOCAL_WORLD_SIZE', world)}"
    elif "LOCAL_SIZE" in os.environ:  # set by DeepSpeed's launcher
        launcher = f"deepspeed --num_gpus {os.environ['LOCAL_SIZE']}"
    else:
        launcher = "python"
    script = sys.argv[0] if sys.argv[0].endswith(".py") else "-m ptscale.cli train"
    return f"{launcher} {script} --ds {args.ds}"


def run_train(args: argparse.Namespace) -> int:
    from ptscale.config import dump_recipe

    cfg, resume = resolve_train_config(args)  # validated before any heavy import
    if args.print_config:
        print(dump_recipe(cfg), end="")
        return 0
    from ptscale.training import engine as ds

    ds_template = ds.load_ds_template(args.ds)
    ds.check_against_recipe(ds_template, cfg.stages, cfg.model.dtype, int(os.environ.get("WORLD_SIZE", "1")),
                            f"--ds {args.ds}")
    from ptscale.training.recipe import PTPEFTRecipe

    recipe = PTPEFTRecipe(cfg, ds_template, resume=resume, command=launch_command(args))
    if args.dry_run:
        recipe.prepare(build_backbone=False)
        if recipe.dist.is_main:
            print(recipe.summary(dry_run=True))
        return 0
    recipe.setup()
    recipe.train()
    recipe.cleanup()
    return 0


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default=None, help="recipe YAML (default: the embedded PT-LoRA recipe)")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides")


def run_config(args: argparse.Namespace) -> int:
    from ptscale.config import dump_recipe, load_recipe

    print(dump_recipe(load_recipe(args.recipe, args.overrides)), end="")
    return 0


def setup_logging(verbosity: Verbosity = "default") -> None:
    """ptscale's events at INFO as plain lines on rank 0, progress bars, real warnings; the library messages
    that never concern the run silenced at their source (ptscale.console). --verbose / --quiet change it."""
    console.setup_logging(verbosity)


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _one_line(kind: str, error: BaseException, everywhere: bool) -> None:
    """``everywhere``: errors that may differ between ranks (a file one rank reads) are printed by every rank,
    with its number; a recipe error is the same on every rank and printed once."""
    text = (str(error).splitlines() or [type(error).__name__])[0]
    if everywhere and os.environ.get("WORLD_SIZE", "1") != "1":
        print(f"ptscale [rank {os.environ.get('RANK', '0')}]: {kind}: {text}", file=sys.stderr)
    elif _is_main_rank():
        print(f"ptscale: {kind}: {text}", file=sys.stderr)


def add_global_args(p: argparse.ArgumentParser) -> None:
    """Accepted anywhere on the command line (``main`` takes them out before a command's parser runs)."""
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    loud = p.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="store_true", help="also DEBUG lines and libraries' INFO logs")
    loud.add_argument("-q", "--quiet", action="store_true", help="only warnings, errors and results; no progress bars")


GLOBAL_FLAGS = ("--debug", "-v", "--verbose", "-q", "--quiet")
# parsed by a small parser of their own (key=value overrides before and after the options): no heavy import
# (torch, transformers, deepspeed) before they run
LIGHT_COMMANDS = ("train", "config", "ls", "cp")


# name -> (its line in the help, where its arguments are defined, where it runs). A command's module is imported
# only when that command runs (or shows its own --help): `ptscale` and `ptscale --help` import no torch.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("run a PT-PEFT recipe", "ptscale.cli:add_train_args", "ptscale.cli:run_train"),
    "config": ("print the fully resolved recipe", "ptscale.cli:add_config_args", "ptscale.cli:run_config"),
    "ls": ("presets, plans, parameter groups, LoRA targets, recipes, recipe keys", "ptscale.listing:add_ls_args",
           "ptscale.listing:run_ls"),
    "cp": ("copy a shipped recipe to start from", "ptscale.listing:add_cp_args", "ptscale.listing:run_cp"),
    "score": ("score saved predictions (COCO captions, VQAv2)", "ptscale.eval.score_cli:add_score_args",
              "ptscale.eval.score_cli:run_score"),
    "eval": ("caption a saved run's eval split and score it", "ptscale.eval.run_eval:add_eval_args",
             "ptscale.eval.run_eval:run_eval_command"),
    "analyze": ("singular-value spectra and effective rank (paper 2.3)", "ptscale.analysis.analyze:add_analyze_args",
                "ptscale.analysis.analyze:run_analyze_command"),
    "report": ("table of runs (paper table 2)", "ptscale.report:add_report_args", "ptscale.report:run_report_command"),
    "export": ("trained weights, PEFT-format LoRA, merged model", "ptscale.export_cli:add_export_args",
               "ptscale.export_cli:run_export_command"),
    "grid": ("arms x seeds x tasks at equal budgets: the paper's tables 1, 2 and figure 4 (README 'Reproducing "
             "the paper's tables')", "ptscale.grid:add_grid_args", "ptscale.grid:run_grid_command"),
}


def _load(where: str):
    module, name = where.split(":")
    return getattr(importlib.import_module(module), name)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every command with its help line; the arguments of ``command`` only (None: the top-level help)."""
    from ptscale import __version__

    parser = argparse.ArgumentParser(
        prog="ptscale", description="Prefix-tuned PEFT (PT-PEFT) under DeepSpeed ZeRO-3",
        epilog="start with: ptscale ls (what is supported), ptscale cp RECIPE my.yaml, ptscale train --recipe "
               "my.yaml; every RUN_DIR argument is a run directory written by ptscale train")
    parser.add_argument("--version", action="version", version=f"ptscale {__version__}")
    add_global_args(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (line, arguments, _) in COMMANDS.items():
        p = sub.add_parser(name, help=line)
        if name == command:
            _load(arguments)(p)
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    return _load(COMMANDS[args.command][2])(args)


def _split_global(argv: list[str]) -> tuple[list[str], argparse.Namespace]:
    """(argv without the global flags, the global flags): they work before or after the command."""
    flags = argparse.ArgumentParser(add_help=False)
    add_global_args(flags)
    found = [a for a in argv if a in GLOBAL_FLAGS]
    try:
        options = flags.parse_args(found)
    except SystemExit:  # -v with -q: argparse has printed why
        raise SystemExit(2) from None
    return [a for a in argv if a not in GLOBAL_FLAGS], options


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    argv, options = _split_global(argv)
    if argv[:1] and argv[0] in LIGHT_COMMANDS:
        parser = argparse.ArgumentParser(prog=f"ptscale {argv[0]}")
        add_global_args(parser)  # shown in --help; already taken out of argv
        _load(COMMANDS[argv[0]][1])(parser)
        args = parser.parse_intermixed_args(argv[1:])  # key=value overrides before and after the options
        args.command = argv[0]
    else:
        parser = build_parser(argv[0] if argv[:1] and argv[0] in COMMANDS else None)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
    setup_logging("verbose" if options.verbose else "quiet" if options.quiet else "default")
    return run_guarded(lambda: _dispatch(args), options.debug)


# (module, class name) -> exit code, kind of message, printed by every rank. Looked up in sys.modules: an
# exception of a class whose module was never imported cannot have been raised, so nothing heavy is imported.
_ERRORS = (
    ("ptscale.errors", "RecipeError", 2, "error", False),
    ("ptscale.errors", "DataError", 3, "data error", True),  # with the data loaders' BadDataError, EmptySplitError
    ("ptscale.checkpoint", "CheckpointError", 3, "file error", True),  # a checkpoint or an output file
    ("ptscale.errors", "TrainingStopped", 1, "training stopped", False),
)


def _classify(error: BaseException) -> tuple[int, str, bool] | None:
    from ptscale.errors import RunInterrupted

    if isinstance(error, RunInterrupted):
        return 128 + error.signum, "interrupted", False
    for module, name, code, kind, everywhere in _ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(error, cls):
            return code, kind, everywhere
    return None


def run_guarded(fn, debug: bool = False) -> int:
    """Run a command, turning the errors a user can cause into one line and an exit code (``--debug`` prints the
    traceback first; the exit code stays the same)."""
    try:
        return fn()
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        _one_line("interrupted", RuntimeError("stopped by SIGINT before training started; start it again"),
                  everywhere=False)
        return 130
    except Exception as e:
        known = _classify(e)
        if known is None:
            raise
        if debug:
            traceback.print_exc()
        code, kind, everywhere = known
        _one_line(kind, e, everywhere)
        return code


if __name__ == "__main__":
    sys.exit(main())
