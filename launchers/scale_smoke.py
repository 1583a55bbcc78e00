"""Scale smoke test: a BLIP-2 preset built sharded under ZeRO-3, one training step of each PT-LoRA stage.

    deepspeed --num_gpus 2 launchers/scale_smoke.py                      # blip2-opt-2.7b, bf16
    deepspeed --num_gpus 2 launchers/scale_smoke.py --preset tiny-blip2-opt --report /tmp/smoke.txt

The preset gets random weights under zero.Init (ptscale.training.sharded.build_sharded_backbone), is wrapped
in PrefixTunedModel (8 prefixes in the Q-Former, 8 in OPT) with LoRA on the Q-Former's query/key/value,
and trains ONE step of ``prefix`` and one of ``prefix+lora`` (batch size 1 per rank, one short synthetic
caption, images resized to the preset's resolution), one DeepSpeed engine per stage as in the recipe.
Each rank reports its peak host RSS (and peak device memory on CUDA) for construction and for each step;
rank 0 prints the report and, with --report, writes it to a file.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import deepspeed
import torch

from ptscale.config import DataConfig, LoraConfig, PrefixConfig, StageConfig
from ptscale.data.collate import make_collator
from ptscale.data.synthetic import make_split
from ptscale.models.groups import group_of, set_trainable
from ptscale.models.memory import gib, memory_report, reset_peaks, return_freed_memory_promptly
from ptscale.prefix.model import PrefixTunedModel
from ptscale.training import engine as ds
from ptscale.training.sharded import build_sharded_backbone, cast_added_parameters
from ptscale.tuners.lora import inject_lora

ROOT = Path(__file__).resolve().parents[1]
STAGES = [StageConfig(name="prefix", train=["prefix"], steps=1, lr=5e-3, batch_size=1),
          StageConfig(name="prefix+lora", train=["prefix", "lora"], steps=1, lr=1e-3, batch_size=1)]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="blip2-opt-2.7b")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--ds", default=str(ROOT / "ds_configs" / "zero3.json"))
    p.add_argument("--max-text-len", type=int, default=8, help="caption tokens per sample (short on purpose)")
    p.add_argument("--report", type=Path, default=None, help="rank 0 also writes the report here")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p.parse_args(argv)


def digests(model: torch.nn.Module, groups: set[str]) -> dict[str, str]:
    """sha256 of the full value of every parameter in ``groups``, gathered one at a time (never all at once)."""
    out = {}
    for name, p in model.named_parameters():
        if group_of(name) in groups:
            with deepspeed.zero.GatheredParameters([p]):
                out[name] = hashlib.sha256(p.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()
    return out


def machine() -> str:
    import psutil  # a DeepSpeed dependency

    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (DeepSpeed CPU accelerator, gloo)"
    import transformers

    return (f"{cpu}, {psutil.cpu_count()} cores, {gib(psutil.virtual_memory().total):.1f} GiB RAM; {device}; "
            f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}")


def command(args: argparse.Namespace, world: int) -> str:
    user = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    launcher = "deepspeed" if args.local_rank is not None else "torchrun"
    gpus = f"--num_gpus {world}" if launcher == "deepspeed" else f"--nproc_per_node {world}"
    return " ".join([launcher, gpus, "launchers/scale_smoke.py", *user])


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    trimmed = return_freed_memory_promptly()  # before the first large allocation: see its docstring
    dist = ds.init_distributed()
    template = ds.load_ds_template(args.ds)
    lines: list[str] = []

    def say(text: str) -> None:  # rank 0 prints and keeps the line for the report
        if dist.is_main:
            print(text, flush=True)
            lines.append(text)

    def per_rank(label: str) -> None:
        for report in ds.gather_objects(memory_report(dist.rank)):
            say("  " + report.line(label))

    say(f"command: {command(args, dist.world_size)}")
    say(f"date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
    say(f"machine: {machine()}")
    say(f"world size {dist.world_size}, preset {args.preset}, dtype {args.dtype}, DeepSpeed config {args.ds}, "
        f"glibc mmap threshold pinned at 64 KiB: {trimmed}")

    # --- construction: partitioned from the first parameter ---------------------------------------------
    reset_peaks()
    t0 = time.time()
    build_cfg = ds.resolve_ds_config(template, STAGES[0], args.dtype, dist.world_size)
    backbone = build_sharded_backbone(args.preset, build_cfg, args.dtype)
    model = PrefixTunedModel(backbone.model, PrefixConfig(lengths={"qformer": 8, "language_model": 8}))
    inject_lora(model, LoraConfig())
    cast_added_parameters(model, args.dtype)  # the fp32 prefixes and LoRA, to the zero.Init model's dtype
    ds.barrier()
    total = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())
    say(f"construction: {time.time() - t0:.1f} s, {total:,} parameters (prefixes and LoRA included)")
    per_rank("construction")

    collator = make_collator(backbone, DataConfig(max_text_len=args.max_text_len))
    records = make_split("downstream", dist.world_size, seed=0, split="train")
    # A different caption per rank, batch size 1; only the model inputs (the collator adds bookkeeping keys).
    batch = {k: v for k, v in collator.train_batch([records[dist.rank]]).items() if isinstance(v, torch.Tensor)}
    say(f"batch per rank: pixel_values {tuple(batch['pixel_values'].shape)}, {batch['input_ids'].shape[1]} tokens")

    # --- one step per stage, one engine per stage (as the recipe does) ---------------------------------
    for stage in STAGES:
        trainable, _ = set_trainable(model, stage.train)
        ds_cfg = ds.resolve_ds_config(template, stage, args.dtype, dist.world_size)
        reset_peaks()
        t_init = time.time()
        engine = ds.build_engine(model, stage, ds_cfg, total_steps=1)
        t_init = time.time() - t_init
        before = digests(model, set(stage.train))
        say(f"[{stage.name}] {trainable:,} trainable; engine built in {t_init:.1f} s")
        times = [time.time()]
        loss = engine(**{k: v.to(engine.device) for k, v in batch.items()}).loss
        times.append(time.time())
        say(f"[{stage.name}] forward {times[1] - times[0]:.1f} s on rank 0")
        engine.backward(loss)
        times.append(time.time())
        engine.step()
        times.append(time.time())
        after = digests(model, set(stage.train))
        moved = sorted({group_of(n) for n in before if before[n] != after[n]})
        losses = ds.gather_objects(round(loss.item(), 4))
        fwd, bwd, opt = (b - a for a, b in zip(times[:-1], times[1:], strict=True))
        say(f"[{stage.name}] step {times[-1] - times[0]:.1f} s on rank 0 (forward {fwd:.1f}, backward {bwd:.1f}, "
            f"optimizer {opt:.1f}); loss per rank {losses}; groups that moved: {', '.join(moved) or 'none'}")
        per_rank(f"{stage.name} step")
        if moved != sorted(stage.train):
            raise RuntimeError(f"[{stage.name}] trained {stage.train} but {moved or 'nothing'} moved")
        ds.release(engine)

    if dist.is_main and args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text("\n".join(lines) + "\n")
        print(f"report written to {args.report}")
    ds.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
