"""Training throughput of each PT-PEFT stage, ptscale vs a PEFT-style baseline, measured in one run.

    python launchers/bench_train.py --out runs/bench_train                       # tiny default, CPU
    deepspeed --num_gpus 1 launchers/bench_train.py --out runs/bench_train model.preset=blip2-opt-2.7b ...

For each stage of the recipe (default: PT-LoRA; add plan=prefix->full for PT-full-FT) and each mode:
  baseline  the PEFT way: prefix K/V expanded to the batch and concatenated in every layer (reference
            attention path), the vision tower run on every step
  ptscale   the frozen vision tower's features cached (stages where it is frozen), the Triton prefix kernel
            where it runs (CUDA), else the same reference path
samples/s, tokens/s, peak memory per rank and, on CUDA, model FLOP utilisation:
  flops/token = 2*N (forward) + 2*N (backward through activations) + 2*N_trainable (weight gradients)
  with N the parameters the token passes through (all of them); MFU = flops/s / the device's dense peak.
Writes bench_train.json (machine, command, date, rows, ratios within this run) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import sys
import time
from pathlib import Path

import torch

from ptscale.config import load_recipe
from ptscale.data.collate import CaptionCollator
from ptscale.data.sources import load_splits
from ptscale.models.build import build_model
from ptscale.models.feature_cache import VisionFeatureCache
from ptscale.models.groups import set_trainable
from ptscale.models.scale import cast_added_parameters
from ptscale.training import engine as ds
from ptscale.training.recipe import load_run_backbone

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, vendor specs


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def peak_memory_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_mode(model, collator, records, stage, ds_template, dtype, world, mode: str, steps: int, warmup: int):
    os.environ["PTSCALE_ATTENTION"] = "reference" if mode == "baseline" else "auto"
    trainable, total = set_trainable(model, stage.train)
    cfg = ds.resolve_ds_config(ds_template, stage, dtype, world)
    engine = ds.build_engine(model, stage, cfg, steps + warmup)
    frozen_tower = not ({"vision", "qformer"} & set(stage.train))
    cache = VisionFeatureCache(f"bench-{stage.name}") if mode == "ptscale" and frozen_tower else None
    bs = stage.batch_size
    # The timed steps cycle over `warmup` batches after one pass over them: an epoch after the first, where
    # a real run's cache hits (the first epoch fills it and costs what the baseline costs).
    n = max(1, min(warmup, len(records) // bs))
    batches = [collator.train_batch(records[i * bs:(i + 1) * bs]) for i in range(n)]
    samples = tokens = 0
    t0 = None
    warmup = n
    for step in range(warmup + steps):
        if step == warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            samples = tokens = 0
        batch = dict(batches[step % len(batches)])
        keys = batch.pop("image_keys")
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        if cache is not None:
            batch["image_embeds"] = cache.image_embeds(model.base.vision_model, keys, batch.pop("pixel_values"))
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        samples += bs * world
        tokens += int(batch["attention_mask"].sum()) * world
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    ds.release(engine)
    flops = tokens * (4 * total + 2 * trainable)
    row = {"stage": stage.name, "mode": mode, "samples_per_s": samples / elapsed, "tokens_per_s": tokens / elapsed,
           "peak_memory_mib": peak_memory_mib(), "trainable": trainable, "total": total,
           "feature_cache": cache is not None, "tflops": flops / elapsed / 1e12}
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in device_name()), None)
    row["mfu"] = row["tflops"] / peak if peak else None
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/bench_train"))
    ap.add_argument("--ds", default="ds_configs/zero3.json")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=8, help="batches in the timed cycle, each run once untimed")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_recipe(None, args.overrides)
    dist = ds.init_distributed()
    template = ds.load_ds_template(args.ds)
    backbone = load_run_backbone(cfg, template, dist)  # as the recipe: partitioned under ZeRO-3 where it applies
    model = build_model(cfg, backbone)
    cast_added_parameters(model, cfg.model.dtype)
    collator = CaptionCollator(backbone.image_processor, backbone.tokenizer, backbone.num_query_tokens,
                               backbone.image_token_id, prompt=cfg.data.prompt)
    records = list(load_splits(cfg.data, collator).train)
    rows = []
    for stage in cfg.stages:
        for mode in ("baseline", "ptscale"):
            rows.append(run_mode(model, collator, records, stage, template, cfg.model.dtype, dist.world_size,
                                 mode, args.steps, args.warmup))
    for stage in cfg.stages:
        base, ours = (next(r for r in rows if r["stage"] == stage.name and r["mode"] == m)
                      for m in ("baseline", "ptscale"))
        ours["speedup_vs_baseline"] = ours["samples_per_s"] / base["samples_per_s"]
    if dist.is_main:
        report = {"device": device_name(), "world_size": dist.world_size, "date": datetime.date.today().isoformat(),
                  "command": shlex.join(sys.argv), "torch": torch.__version__, "rows": rows}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_train.json").write_text(json.dumps(report, indent=1))
        print(f"device: {report['device']}, ranks: {dist.world_size}")
        print(f"{'stage':<14}{'mode':<10}{'samples/s':>11}{'tokens/s':>11}{'peak MiB':>10}{'speed-up':>10}")
        for r in rows:
            speed = f"{r['speedup_vs_baseline']:.2f}x" if "speedup_vs_baseline" in r else ""
            print(f"{r['stage']:<14}{r['mode']:<10}{r['samples_per_s']:>11.1f}{r['tokens_per_s']:>11.1f}"
                  f"{r['peak_memory_mib']:>10.0f}{speed:>10}")
    ds.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
