"""Training throughput of each PT-PEFT stage, ptscale vs a PEFT-style baseline, measured in one run.

    python launchers/bench_train.py --out runs/bench_train                       # tiny default, CPU
    deepspeed --num_gpus 1 launchers/bench_train.py --out runs/bench_train model.preset=blip2-opt-2.7b ...

For each stage of the recipe (default: PT-LoRA; add plan=prefix->full for PT-full-FT) and each mode (--modes):
  baseline  the PEFT way: prefix K/V expanded to the batch and concatenated in every layer (reference
            attention path), the vision tower run on every step
  kernel    the Triton prefix kernel where the hook can use it (CUDA; not for layers with attention dropout in
            training, see `served`), the vision tower run on every step
  cache     the reference attention path, the frozen vision tower's features from the feature cache
  ptscale   both: kernel and feature cache
so that the kernel's and the cache's effects can be read apart. Each row records `served`, the number of
prefix-attention calls each path served in its timed steps (a kernel mode on CPU, or a Q-Former with attention
dropout, still runs the reference path there, and the row says so).
samples/s, tokens/s, peak memory per rank (CUDA: reset before each mode; CPU: the process's peak RSS, which
cannot be reset, so only the first mode's is its own) and, on CUDA, model FLOP utilisation. FLOPs count each
component per token it processes, with N_c its parameters and T_c its trainable ones:
  2*N_c (forward) + 2*N_c (backward through activations, when something trainable sits in or before it)
  + 2*T_c (weight gradients); vision tower per image patch token (not counted when the cache skips it),
  Q-Former and projection per query token, language model per text token (embedding lookups not counted).
MFU = flops/s / the device's dense bf16 peak.
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
from ptscale.data.collate import make_collator
from ptscale.data.sources import load_splits
from ptscale.models.backbone import resolve_source
from ptscale.models.build import build_model
from ptscale.models.feature_cache import VisionFeatureCache
from ptscale.models.groups import numel, set_trainable
from ptscale.prefix import attention as prefix_attention
from ptscale.training import engine as ds
from ptscale.training.sharded import build_backbone, cast_added_parameters

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, vendor specs


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def peak_memory_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


MODES = ("baseline", "kernel", "cache", "ptscale")
_KERNEL_MODES = ("kernel", "ptscale")
_CACHE_MODES = ("cache", "ptscale")
# Components in the order the data flows through them, and the parameter-name prefixes that belong to each.
_COMPONENTS = (("vision", ("base.vision_model.",)), ("qformer", ("base.qformer.", "base.query_tokens")),
               ("projection", ("base.language_projection.",)), ("language_model", ("base.language_model.",)))
_LOOKUPS = ("embed_tokens.", "embed_positions.", ".shared.")  # embedding tables: lookups, no matmul FLOPs


def component_sizes(model) -> dict[str, dict[str, int]]:
    """component -> {"params": N_c, "trainable": T_c, "prefix": trainable prefix elements feeding it}."""
    sizes = {name: {"params": 0, "trainable": 0, "prefix": 0} for name, _ in _COMPONENTS}
    for name, p in model.named_parameters():
        if name.startswith("prefixes."):
            target = name.split(".")[1]
            component = {"vision": "vision", "qformer": "qformer"}.get(target, "language_model")
            sizes[component]["prefix"] += numel(p) if p.requires_grad else 0
            continue
        component = next((c for c, prefixes in _COMPONENTS if name.startswith(prefixes)), None)
        if component is None or any(t in name for t in _LOOKUPS):
            continue
        sizes[component]["params"] += numel(p)
        sizes[component]["trainable"] += numel(p) if p.requires_grad else 0
    return sizes


def step_flops(sizes: dict[str, dict[str, int]], tokens: dict[str, int], vision_ran: bool) -> float:
    """Model FLOPs of one step (see the module docstring); ``tokens``: per component, tokens processed."""
    flops, upstream_trainable = 0.0, False
    for name, _ in _COMPONENTS:
        c = sizes[name]
        upstream_trainable = upstream_trainable or c["trainable"] > 0 or c["prefix"] > 0
        if name == "vision" and not vision_ran:
            continue
        per_token = 2 * c["params"] + (2 * c["params"] if upstream_trainable else 0) + 2 * c["trainable"]
        flops += tokens[name] * per_token
    return flops


def _vision_tokens(model) -> int:
    vc = model.base.config.vision_config
    return (vc.image_size // vc.patch_size) ** 2 + 1  # patches + the class token


def run_mode(model, collator, records, stage, ds_template, dtype, world, mode: str, steps: int, warmup: int):
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    os.environ["PTSCALE_ATTENTION"] = "auto" if mode in _KERNEL_MODES else "reference"
    trainable, total = set_trainable(model, stage.train)
    sizes = component_sizes(model)
    cfg = ds.resolve_ds_config(ds_template, stage, dtype, world)
    engine = ds.build_engine(model, stage, cfg, steps + warmup)
    frozen_tower = not ({"vision", "qformer"} & set(stage.train))
    cache = VisionFeatureCache(f"bench-{stage.name}") if mode in _CACHE_MODES and frozen_tower else None
    bs = stage.batch_size
    # The timed steps cycle over `warmup` batches after one pass over them: an epoch after the first, where
    # a real run's cache hits (the first epoch fills it and costs what the baseline costs).
    n = max(1, min(warmup, len(records) // bs))
    batches = [collator.train_batch(records[i * bs:(i + 1) * bs]) for i in range(n)]
    # Token counts on the host, before any batch moves to the device: no device sync inside the timed loop.
    text_tokens = [int(b["attention_mask"].sum()) for b in batches]
    images = [int(b["pixel_values"].shape[0]) for b in batches]
    per_image = {"vision": _vision_tokens(model), "qformer": model.base.config.num_query_tokens,
                 "projection": model.base.config.num_query_tokens}
    samples = tokens = 0
    flops = 0.0
    t0 = None
    warmup = n
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # this mode's peak, not the largest of all modes so far
    for step in range(warmup + steps):
        if step == warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            samples = tokens = 0
            flops = 0.0
            prefix_attention.served.clear()
        i = step % len(batches)
        batch = dict(batches[i])
        keys = batch.pop("image_keys")
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        if cache is not None:
            batch["image_embeds"] = cache.image_embeds(model.base.vision_model, keys, batch.pop("pixel_values"))
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        samples += bs * world
        tokens += text_tokens[i] * world
        counts = {c: images[i] * k for c, k in per_image.items()} | {"language_model": text_tokens[i]}
        flops += step_flops(sizes, counts, vision_ran=cache is None) * world
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    ds.release(engine)
    served = {f"{variant}/{path}": n for (variant, path), n in sorted(prefix_attention.served.items())}
    row = {"stage": stage.name, "mode": mode, "samples_per_s": samples / elapsed, "tokens_per_s": tokens / elapsed,
           "peak_memory_mib": peak_memory_mib(),
           "peak_memory_scope": "this mode (CUDA peak reset)" if torch.cuda.is_available()
           else "process (CPU peak RSS, never reset)",
           "trainable": trainable, "total": total, "components": sizes,
           "feature_cache": cache is not None, "served": served, "tflops": flops / elapsed / 1e12}
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in device_name()), None)
    row["mfu"] = row["tflops"] / peak if peak and torch.cuda.is_available() else None
    return row


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_baseline for every row whose stage has a baseline row in the same run."""
    for r in rows:
        base = next((b for b in rows if b["stage"] == r["stage"] and b["mode"] == "baseline"), None)
        if base is not None and r is not base:
            r["speedup_vs_baseline"] = r["samples_per_s"] / base["samples_per_s"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/bench_train"))
    ap.add_argument("--ds", default="ds_configs/zero3.json")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=8, help="batches in the timed cycle, each run once untimed")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_recipe(None, args.overrides)
    dist = ds.init_distributed()
    template = ds.load_ds_template(args.ds)
    source = resolve_source(cfg.model, rank=dist.rank, barrier=ds.barrier)
    # as the recipe builds it: partitioned under ZeRO-3 where it applies
    backbone = build_backbone(source, cfg.model, ds.zero3_config(template, cfg.stages[0], cfg.model.dtype,
                                                                 dist.world_size))
    model = build_model(cfg, backbone)
    cast_added_parameters(model, cfg.model.dtype)
    collator = make_collator(backbone, cfg.data)
    records = list(load_splits(cfg.data, collator).train)
    modes = args.modes.split(",")
    rows = []
    for stage in cfg.stages:
        for mode in modes:
            rows.append(run_mode(model, collator, records, stage, template, cfg.model.dtype, dist.world_size,
                                 mode, args.steps, args.warmup))
    add_speedups(rows)
    if dist.is_main:
        report = {"device": device_name(), "world_size": dist.world_size, "date": datetime.date.today().isoformat(),
                  "command": shlex.join(sys.argv), "torch": torch.__version__, "rows": rows}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_train.json").write_text(json.dumps(report, indent=1))
        print(f"device: {report['device']}, ranks: {dist.world_size}")
        print(f"{'stage':<14}{'mode':<10}{'samples/s':>11}{'tokens/s':>11}{'peak MiB':>10}{'speed-up':>10}"
              f"{'MFU':>7}  served")
        for r in rows:
            speed = f"{r['speedup_vs_baseline']:.2f}x" if "speedup_vs_baseline" in r else ""
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
            print(f"{r['stage']:<14}{r['mode']:<10}{r['samples_per_s']:>11.1f}{r['tokens_per_s']:>11.1f}"
                  f"{r['peak_memory_mib']:>10.0f}{speed:>10}{mfu:>7}  {r['served']}")
    ds.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
