"""``ptscale eval``: caption a saved run's evaluation split, score it, write the results.

    ptscale eval RUN_DIR [--ckpt CKPT_DIR] [--split eval] [--num-beams N]
                 [--max-new-tokens N] [--min-new-tokens N] [--batch-size N] [--spice auto|require|off]
                 [--out DIR]
    deepspeed --num_gpus 2 launchers/eval.py RUN_DIR ...

RUN_DIR is positional, as for ``analyze``, ``report`` and ``export``; ``--checkpoint RUN_DIR`` (its old spelling)
still works and prints one deprecation line.

The run is loaded with :func:`ptscale.runs.load_run` (recipe + newest checkpoint, no DeepSpeed), so the
same weights load on any number of ranks. Generation settings default to the run's own ``eval`` section:
with no overrides the captions are those the run wrote at its last stage.

Several ranks: the model is wrapped in a ZeRO-3 engine built without an optimizer (DeepSpeed then only
partitions parameters and gathers them in the forward hooks; every parameter has ``requires_grad=False``),
the records are sharded with :func:`ptscale.eval.generate.shard` (padded so all ranks generate the same
number of batches, as ``synced_gpus`` requires), the captions are gathered, padding duplicates collapse by
image id, and rank 0 scores and writes. ZeRO-3 rather than plain replication so that a model that only fits
sharded (what training needed) also evaluates; for small models it costs a parameter gather per layer call.

A world of one (plain ``python``) uses no DeepSpeed and no process group at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ptscale.checkpoint import write_text_atomic
from ptscale.config import DEFAULT_DS, EvalConfig, RunConfig
from ptscale.dist import ALONE, DistInfo
from ptscale.errors import RecipeError
from ptscale.eval.captioning import SPICE_CHOICES
from ptscale.eval.evaluate import generate_gathered, load_eval_data, score

EVAL_RESULTS = "eval_results.json"
EVAL_ROWS = {"caption": "eval_captions.json", "vqa": "eval_answers.json",  # per-item rows, by task
             "text": "eval_predictions.json"}
COUNTED = {"caption": ("n_images", "images"), "vqa": ("n_questions", "questions"), "text": ("n_records", "records")}

# --- Settings and distribution -----------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalRequest:
    run_dir: Path
    checkpoint: Path | None = None  # a checkpoints/ckpt-* directory; None: the newest
    split: str = "eval"
    num_beams: int | None = None  # None: the run's eval section
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    batch_size: int | None = None
    spice: str = "auto"
    out_dir: Path | None = None  # None: RUN_DIR/eval
    ds_config: Path | None = None  # ZeRO-3 template for several ranks; None: the shipped ds_configs/zero3.json


def generation_settings(run_eval_cfg: EvalConfig, request: EvalRequest) -> EvalConfig:
    """The run's generation settings with the request's overrides on top."""
    overrides = {k: getattr(request, k) for k in ("num_beams", "max_new_tokens", "min_new_tokens", "batch_size")
                 if getattr(request, k) is not None}
    for key, value in overrides.items():
        lowest = 0 if key == "min_new_tokens" else 1
        if value < lowest:
            raise RecipeError(f"--{key.replace('_', '-')} must be >= {lowest}, got {value}")
    settings = dataclasses.replace(run_eval_cfg, **overrides)
    if settings.min_new_tokens > settings.max_new_tokens:
        raise RecipeError(f"--min-new-tokens {settings.min_new_tokens} exceeds --max-new-tokens "
                         f"{settings.max_new_tokens}")
    return settings


def join_world() -> DistInfo:
    """Under deepspeed/torchrun (RANK set) join the process group; plain python is a world of one with no
    process group, so calling this in-process (tests, notebooks) leaves no gloo group or env vars behind."""
    if "RANK" not in os.environ:
        return ALONE
    from ptscale.training import engine as ds

    info = ds.init_distributed()
    return info


def local_device(world: DistInfo) -> torch.device:
    return torch.device("cuda", world.local_rank) if torch.cuda.is_available() else torch.device("cpu")


# --- The evaluation ----------------------------------------------------------------------------------------

@dataclass
class EvalOutcome:
    results: dict[str, Any]
    out_dir: Path


def generate_all(model, collator, records: Sequence[dict], settings: EvalConfig, world: DistInfo,
                 ds_config: Path | None, cfg: RunConfig) -> dict[str, str]:
    """key (image_id; question_id for VQA) -> generated text for every record, on every rank (gathered). Several
    ranks shard the model in a ZeRO-3 inference engine for the duration."""
    if world.world_size == 1:
        model.to(local_device(world))
        return generate_gathered(model, collator, records, settings, world)
    from ptscale.training import engine as ds

    engine = ds.inference_engine(model, ds_config or DEFAULT_DS, cfg.model.dtype, world.world_size)
    try:  # while the engine lives: its hooks gather the shards
        return generate_gathered(model, collator, records, settings, world, synced=True)
    finally:
        ds.release(engine)


def evaluate_run(request: EvalRequest) -> EvalOutcome | None:
    """Generate, gather, score, write. Returns the results on rank 0, None on the other ranks."""
    from ptscale.rundir import load_run_recipe
    from ptscale.runs import load_run

    if (Path(request.run_dir) / "recipe.yaml").is_file():  # the options are checked before the model loads
        generation_settings(load_run_recipe(request.run_dir).eval, request)
    world = join_world()
    t0 = time.time()
    run = load_run(request.run_dir, request.checkpoint)
    settings = generation_settings(run.cfg.eval, request)
    data = load_eval_data(run.cfg, run.collator, request.split)
    preds = generate_all(run.model, run.collator, data.records, settings, world, request.ds_config, run.cfg)
    outcome = None
    if world.is_main:
        scored = score(preds, data, request.spice)
        out_dir = Path(request.out_dir) if request.out_dir else Path(request.run_dir) / "eval"
        results = {
            "run_dir": str(request.run_dir), "checkpoint": str(run.checkpoint), "task": data.task,
            "data": data.description,
            "generation": {k: getattr(settings, k) for k in ("num_beams", "max_new_tokens", "min_new_tokens",
                                                              "batch_size")},
            "world_size": world.world_size, **scored.fields, "seconds": round(time.time() - t0, 2),
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_dir / EVAL_ROWS[data.task], json.dumps(scored.rows, indent=1))
        write_text_atomic(out_dir / EVAL_RESULTS, json.dumps(results, indent=1))
        outcome = EvalOutcome(results, out_dir)
    if world.world_size > 1:
        from ptscale.training import engine as ds

        ds.barrier()  # no rank exits (and tears down the group) while rank 0 still writes
    return outcome


# --- Command line ------------------------------------------------------------------------------------------

def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, nargs="?", default=None, metavar="RUN_DIR",
                   help="a run directory written by ptscale train (launchers/train.py)")
    p.add_argument("--checkpoint", type=Path, default=None, metavar="RUN_DIR",
                   help="deprecated spelling of RUN_DIR (kept working)")
    p.add_argument("--ckpt", type=Path, default=None, metavar="CKPT_DIR",
                   help="a checkpoints/ckpt-* directory of that run (default: the newest)")
    p.add_argument("--split", choices=("eval", "train"), default="eval",
                   help="split of the run's data (default: eval; train: synthetic task only)")
    p.add_argument("--num-beams", type=int, default=None, help="default: the run's eval.num_beams")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's eval.max_new_tokens")
    p.add_argument("--min-new-tokens", type=int, default=None, help="default: the run's eval.min_new_tokens")
    p.add_argument("--batch-size", type=int, default=None, help="images per generate call (default: the run's)")
    p.add_argument("--spice", choices=SPICE_CHOICES, default="auto",
                   help="auto: SPICE if its jars are present and it runs (default)")
    p.add_argument("--ds", type=Path, default=None, help="ZeRO-3 DeepSpeed JSON for several ranks "
                   "(default: ds_configs/zero3.json)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: RUN_DIR/eval)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher


def eval_run_dir(args: argparse.Namespace) -> Path:
    """RUN_DIR, or the deprecated ``--checkpoint RUN_DIR``; one of them, once."""
    from ptscale.errors import RecipeError

    if args.run_dir is not None and args.checkpoint is not None:
        raise RecipeError("give the run directory once: ptscale eval RUN_DIR (--checkpoint is its old spelling)")
    if args.run_dir is None and args.checkpoint is None:
        raise RecipeError("ptscale eval: name the run directory: ptscale eval RUN_DIR")
    if args.checkpoint is not None:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"ptscale: --checkpoint RUN_DIR is deprecated; write: ptscale eval {args.checkpoint} "
                  "(--ckpt CKPT_DIR picks a checkpoint inside the run)", file=sys.stderr)
        return args.checkpoint
    return args.run_dir


def run_eval_command(args: argparse.Namespace) -> int:
    request = EvalRequest(run_dir=eval_run_dir(args), checkpoint=args.ckpt, split=args.split, num_beams=args.num_beams,
                          max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                          batch_size=args.batch_size, spice=args.spice, out_dir=args.out, ds_config=args.ds)
    outcome = evaluate_run(request)
    if outcome is not None:
        r = outcome.results
        shown = "  ".join(f"{k} {v:.4f}" for k, v in r["metrics"].items())
        key, what = COUNTED[r["task"]]
        print(f"[eval {r['data']['split']}: {r.get(key)} {what}, "
              f"{r['checkpoint']}] {shown}")
        for name, reason in r["unavailable"].items():
            print(f"{name}: n/a ({reason})")
        print(f"eval directory: {outcome.out_dir}")
    return 0
