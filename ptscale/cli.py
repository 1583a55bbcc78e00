"""``ptscale``: train (the same entry as launchers/train.py), score saved predictions, evaluate a saved run
(``eval``), analyse its representation spectra (``analyze``) and tabulate runs (``report``)."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import resources
from pathlib import Path

# package data (ptscale/ds_configs; the checkout's top-level ds_configs/ links to it): found after `pip install .`
DEFAULT_DS = Path(str(resources.files("ptscale").joinpath("ds_configs", "zero3.json")))


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default=None, help="recipe YAML (default: the embedded PT-LoRA recipe)")
    p.add_argument("--ds", default=str(DEFAULT_DS), help="DeepSpeed JSON; 'auto' values come from the recipe")
    p.add_argument("--resume", default=None, metavar="auto|CKPT_DIR",
                   help="continue from the newest complete checkpoint (auto) or a given one")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides, e.g. stages.0.lr=1e-3")


def run_train(args: argparse.Namespace) -> int:
    from ptscale.config import load_recipe
    from ptscale.training.engine import load_ds_template
    from ptscale.training.recipe import PTPEFTRecipe

    cfg = load_recipe(args.recipe, args.overrides)  # validated before any model is built
    ds_template = load_ds_template(args.ds)
    recipe = PTPEFTRecipe(cfg, ds_template, resume=args.resume)
    recipe.setup()
    recipe.train()
    recipe.cleanup()
    return 0


def setup_logging() -> None:
    import os

    quiet = int(os.environ.get("RANK", "0")) != 0
    logging.basicConfig(level=logging.ERROR if quiet else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    from ptscale.config import RecipeError
    from ptscale.data.bad_data import BadDataError, EmptySplitError

    parser = argparse.ArgumentParser(prog="ptscale")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_args(sub.add_parser("train", help="run a PT-PEFT recipe"))
    from ptscale.eval.score_cli import add_score_subparser, run_score

    add_score_subparser(sub)
    from ptscale.analysis.analyze import add_analyze_args, run_analyze_command
    from ptscale.eval.run_eval import add_eval_args, run_eval_command
    from ptscale.report import add_report_args, run_report_command

    add_eval_args(sub.add_parser("eval", help="caption a saved run's eval split and score it"))
    add_analyze_args(sub.add_parser("analyze", help="singular-value spectra and effective rank (paper 2.3)"))
    add_report_args(sub.add_parser("report", help="markdown table of runs (paper table 2)"))
    from ptscale.export_cli import add_export_args, run_export_command

    add_export_args(sub.add_parser("export", help="trained weights, PEFT-format LoRA, merged model"))
    args = parser.parse_args(argv)
    setup_logging()
    commands = {"eval": run_eval_command, "analyze": run_analyze_command, "report": run_report_command,
                "export": run_export_command}
    try:
        if args.command == "train":
            return run_train(args)
        if args.command in commands:
            return commands[args.command](args)
        return run_score(args)
    except RecipeError as e:
        print(f"ptscale: recipe error: {e}", file=sys.stderr)
        return 2
    except (BadDataError, EmptySplitError) as e:
        print(f"ptscale: data error: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
