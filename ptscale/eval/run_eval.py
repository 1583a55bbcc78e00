"""``ptscale eval``: caption a saved run's evaluation split, score it, write the results.

    ptscale eval --checkpoint RUN_DIR [--ckpt CKPT_DIR] [--split eval] [--num-beams N]
                 [--max-new-tokens N] [--min-new-tokens N] [--batch-size N] [--spice auto|require|off]
                 [--out DIR]
    deepspeed --num_gpus 2 launchers/eval.py --checkpoint RUN_DIR ...

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
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ptscale.checkpoint import write_text_atomic
from ptscale.config import EvalConfig, RunConfig, StageConfig
from ptscale.data.synthetic import make_split

EVAL_RESULTS = "eval_results.json"
EVAL_CAPTIONS = "eval_captions.json"
PER_IMAGE_HEADLINE = ("Bleu_4", "CIDEr")

# --- Data sources: cfg.data.name -> records of a split ---------------------------------------------------
# A source returns records {"image_id": str, "image": PIL image (or "pixel_values"), "captions": [refs],
# "target": str}; ``size`` None means the split's size as the recipe gives it. Register a new dataset here
# (e.g. COCO Karpathy test) and both ``ptscale eval`` and ``ptscale analyze`` can use it.
RecordSource = Callable[[RunConfig, str, int | None], list[dict]]


def synthetic_records(cfg: RunConfig, split: str, size: int | None) -> list[dict]:
    """The built-in task's split exactly as training built it (same task, seed and size)."""
    d = cfg.data
    sizes = {"eval": d.eval_size, "train": d.train_size}
    if size is None and split not in sizes:
        raise ValueError(f"--split {split!r}: the synthetic data has splits {', '.join(sizes)}")
    return make_split(d.task, size if size is not None else sizes[split], d.seed, split)


SOURCES: dict[str, RecordSource] = {"synthetic": synthetic_records}


def split_records(cfg: RunConfig, split: str = "eval", size: int | None = None) -> list[dict]:
    source = SOURCES.get(cfg.data.name)
    if source is None:
        raise ValueError(f"data.name {cfg.data.name!r}: no evaluation source registered "
                         f"(known: {', '.join(SOURCES)})")
    return source(cfg, split, size)


def describe_split(cfg: RunConfig, split: str, n: int) -> dict[str, Any]:
    """What was evaluated, for the results file (enough to rebuild the split)."""
    return {"source": cfg.data.name, "task": cfg.data.task, "seed": cfg.data.seed, "split": split, "size": n,
            "prompt": cfg.data.prompt}


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
        if value < (0 if key == "min_new_tokens" else 1):
            raise ValueError(f"--{key.replace('_', '-')} must be positive, got {value}")
    return dataclasses.replace(run_eval_cfg, **overrides)


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def join_world() -> World:
    """Under deepspeed/torchrun (RANK set) join the process group; plain python is a world of one with no
    process group, so calling this in-process (tests, notebooks) leaves no gloo group or env vars behind."""
    if "RANK" not in os.environ:
        return World(0, 1, 0)
    from ptscale.training import engine as ds

    info = ds.init_distributed()
    return World(info.rank, info.world_size, info.local_rank)


def local_device(world: World) -> torch.device:
    return torch.device("cuda", world.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def zero3_inference_engine(model: torch.nn.Module, cfg: RunConfig, world_size: int, ds_config: Path | None):
    """A ZeRO-3 engine with no optimizer: DeepSpeed builds only its parameter partitioning and gather hooks
    (DeepSpeedZeRoOffload). Nothing requires grad, so no gradient hooks or fp32 partitions are made."""
    import deepspeed

    from ptscale.cli import DEFAULT_DS
    from ptscale.training import engine as ds

    for p in model.parameters():
        p.requires_grad_(False)
    template = ds.load_ds_template(ds_config or DEFAULT_DS)
    if ds.zero_stage(template) != 3:
        raise ValueError(f"{ds_config}: evaluation on several ranks shards the model with ZeRO stage 3; "
                         "this config sets another stage")
    # batch_size=1: the "auto" micro-batch must resolve to something; inference never reads it.
    ds_cfg = ds.resolve_ds_config(template, StageConfig(train=["prefix"], batch_size=1), cfg.model.dtype,
                                  world_size)
    engine, *_ = deepspeed.initialize(model=model, config=ds_cfg)
    return engine


def _gather_captions(mine: dict[str, str], world: World) -> dict[str, str]:
    if world.size == 1:
        return dict(mine)
    from ptscale.training import engine as ds

    merged: dict[str, str] = {}
    for part in ds.gather_objects(mine):
        merged.update(part)  # shard padding repeats records: the same id, the same caption
    return merged


# --- The evaluation ----------------------------------------------------------------------------------------

@dataclass
class EvalOutcome:
    results: dict[str, Any]
    out_dir: Path


def caption_records(model, collator, records: list[dict], settings: EvalConfig, world: World,
                    ds_config: Path | None, cfg: RunConfig) -> dict[str, str]:
    """image_id -> caption for every record, on every rank (gathered)."""
    from ptscale.eval.generate import generate_captions

    if world.size == 1:
        model.to(local_device(world))
        return generate_captions(model, collator, records, settings)
    engine = zero3_inference_engine(model, cfg, world.size, ds_config)
    try:
        mine = generate_captions(model, collator, records, settings, rank=world.rank, world=world.size,
                                 synced=True)  # while the engine lives: its hooks gather the shards
        return _gather_captions(mine, world)
    finally:
        from ptscale.training import engine as ds

        ds.release(engine)


def evaluate_run(request: EvalRequest) -> EvalOutcome | None:
    """Generate, gather, score, write. Returns the results on rank 0, None on the other ranks."""
    from ptscale.eval.captioning import score_captions
    from ptscale.runs import load_run

    world = join_world()
    t0 = time.time()
    run = load_run(request.run_dir, request.checkpoint)
    settings = generation_settings(run.cfg.eval, request)
    records = run.collator.preprocess(split_records(run.cfg, request.split))
    captions = caption_records(run.model, run.collator, records, settings, world, request.ds_config, run.cfg)
    missing = [r["image_id"] for r in records if r["image_id"] not in captions]
    if missing:
        raise RuntimeError(f"no caption came back for {len(missing)} image(s), e.g. {missing[:3]}")
    outcome = None
    if world.is_main:
        references = {r["image_id"]: r["captions"] for r in records}
        scores = score_captions(captions, references, spice=request.spice)
        out_dir = Path(request.out_dir) if request.out_dir else Path(request.run_dir) / "eval"
        results = {
            "run_dir": str(request.run_dir), "checkpoint": str(run.checkpoint),
            "data": describe_split(run.cfg, request.split, len(records)),
            "generation": {k: getattr(settings, k) for k in ("num_beams", "max_new_tokens", "min_new_tokens",
                                                              "batch_size")},
            "world_size": world.size, "metrics": scores.metrics, "unavailable": scores.unavailable,
            "n_images": scores.n_images, "empty_predictions": scores.empty_predictions, "warnings": scores.warnings,
            "seconds": round(time.time() - t0, 2),
        }
        per_image = [{"image_id": r["image_id"], "caption": captions[r["image_id"]], "references": r["captions"],
                      **{m: scores.per_image[r["image_id"]][m] for m in PER_IMAGE_HEADLINE},
                      "scores": scores.per_image[r["image_id"]]} for r in records]
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_dir / EVAL_CAPTIONS, json.dumps(per_image, indent=1))
        write_text_atomic(out_dir / EVAL_RESULTS, json.dumps(results, indent=1))
        outcome = EvalOutcome(results, out_dir)
    if world.size > 1:
        from ptscale.training import engine as ds

        ds.barrier()  # no rank exits (and tears down the group) while rank 0 still writes
    return outcome


# --- Command line ------------------------------------------------------------------------------------------

def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, metavar="RUN_DIR",
                   help="a run directory written by launchers/train.py")
    p.add_argument("--ckpt", type=Path, default=None, metavar="CKPT_DIR",
                   help="a checkpoints/ckpt-* directory of that run (default: the newest)")
    p.add_argument("--split", default="eval", help="split of the run's data to caption (default: eval)")
    p.add_argument("--num-beams", type=int, default=None, help="default: the run's eval.num_beams")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's eval.max_new_tokens")
    p.add_argument("--min-new-tokens", type=int, default=None, help="default: the run's eval.min_new_tokens")
    p.add_argument("--batch-size", type=int, default=None, help="images per generate call (default: the run's)")
    p.add_argument("--spice", choices=("auto", "require", "off"), default="auto",
                   help="auto: SPICE if its jars are present and it runs (default)")
    p.add_argument("--ds", type=Path, default=None, help="ZeRO-3 DeepSpeed JSON for several ranks "
                   "(default: ds_configs/zero3.json)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: RUN_DIR/eval)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher


def run_eval_command(args: argparse.Namespace) -> int:
    request = EvalRequest(run_dir=args.checkpoint, checkpoint=args.ckpt, split=args.split, num_beams=args.num_beams,
                          max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                          batch_size=args.batch_size, spice=args.spice, out_dir=args.out, ds_config=args.ds)
    outcome = evaluate_run(request)
    if outcome is not None:
        r = outcome.results
        shown = "  ".join(f"{k} {v:.4f}" for k, v in r["metrics"].items())
        print(f"[eval {r['data']['split']}: {r['n_images']} images, {r['checkpoint']}] {shown}")
        for name, reason in r["unavailable"].items():
            print(f"{name}: n/a ({reason})")
        print(f"eval directory: {outcome.out_dir}")
    return 0
