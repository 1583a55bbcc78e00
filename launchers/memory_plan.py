"""Memory plan: bytes per rank for each PT-PEFT stage under ZeRO-3, before renting any GPU.

    python launchers/memory_plan.py                                  # 2.7b and 6.7b; 1, 4, 8 GPUs
    python launchers/memory_plan.py --presets blip2-opt-2.7b --gpus 4 --json plan.json

Parameter counts are exact: each preset is built on the meta device (no memory) with the prefixes
(8 in the Q-Former, 8 in OPT, MLP re-parameterisation) and LoRA (r=16 on the Q-Former query/key/value)
of the default recipe, and every parameter is assigned to its group by ptscale.models.groups.
Bytes follow ptscale.training.memory_plan.plan_rank (bf16 weights and gradient partitions; fp32 master and
Adam moments for trainables only; DeepSpeed's reduce bucket and live-parameter budget read from the
DeepSpeed JSONs); activations are excluded and reported as the headroom left for them. DeepSpeed's
own estimator (which assumes every parameter trains) is printed alongside for comparison.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ptscale.models.memory import gib
from ptscale.training.memory_plan import (
    STAGE_PLANS,
    ParamCounts,
    RankPlan,
    ZeroBuffers,
    activation_headroom,
    count_parameters,
    deepspeed_estimate,
    plan_rank,
)

ROOT = Path(__file__).resolve().parents[1]
# Nominal memory per GPU; RESERVE of it is kept back for the CUDA context, NCCL and fragmentation.
DEVICES = {"A100-40GB": 40 * 2**30, "H100-80GB": 80 * 2**30}
RESERVE = 0.10


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["blip2-opt-2.7b", "blip2-opt-6.7b"])
    p.add_argument("--gpus", nargs="+", type=int, default=[1, 4, 8])
    p.add_argument("--ds", type=Path, default=ROOT / "ds_configs" / "zero3.json")
    p.add_argument("--ds-offload", type=Path, default=ROOT / "ds_configs" / "zero3_offload.json")
    p.add_argument("--json", type=Path, default=None, help="write the plan here as JSON")
    return p.parse_args(argv)


def plan_rows(counts: ParamCounts, gpus: list[int], configs: dict[str, ZeroBuffers]) -> list[dict]:
    rows = []
    for stage in STAGE_PLANS:
        for n in gpus:
            for buffers in configs.values():
                plan = plan_rank(counts, stage, n, buffers)
                headroom = {name: activation_headroom(plan, size, RESERVE) for name, size in DEVICES.items()}
                rows.append({**plan.as_dict(), "activation_headroom": headroom})
    return rows


def table(rows: list[dict]) -> str:
    head = ["preset", "stage", "GPUs", "offload", "trainable", "train GiB", "frozen GiB", "grad GiB", "optim GiB",
            "buffers GiB", "GPU GiB/rank", "host GiB/node", *(f"left {d}" for d in DEVICES)]
    body = []
    for r in rows:
        plan = RankPlan(**{k: v for k, v in r.items() if k != "activation_headroom"})
        body.append([plan.preset, plan.stage, str(plan.gpus), "cpu" if plan.offload else "-",
                     f"{plan.trainable_params / 1e6:,.1f}M",
                     *(f"{gib(b):.2f}" for b in (plan.trainable_bytes, plan.frozen_bytes, plan.gradient_bytes,
                                                 plan.optimizer_bytes, plan.buffer_bytes, plan.device_bytes,
                                                 plan.host_bytes * plan.gpus)),
                     *(f"{gib(r['activation_headroom'][d]):.1f}" for d in DEVICES)])
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    configs = {path.name: ZeroBuffers.from_ds_config(json.loads(path.read_text()))
               for path in (args.ds, args.ds_offload)}
    out: dict = {"assumptions": {
        "weights": "bf16 partitions of every parameter (2 B / parameter / ranks)",
        "gradients": "bf16 partitions of trained parameters + fp32 copy of one optimizer sub-group at the step "
                     "(offloaded optimizer: fp32 gradient buffers in host memory)",
        "optimizer": "fp32 master + Adam exp_avg + exp_avg_sq for trained parameters only (12 B / parameter / ranks)",
        "buffers": "reduce bucket (bf16, reduce_bucket_size) + gathered parameters up to max_live_parameters + "
                   "prefetch_bucket_size (bf16), from the DeepSpeed JSONs or DeepSpeed's defaults",
        "activations": "excluded; activation_headroom = (1 - reserve) * device memory - GPU bytes per rank",
        "reserve": RESERVE, "devices_bytes": DEVICES,
        "zero_settings": {name: vars(b) for name, b in configs.items()}}, "counts": {}, "plans": [],
        "deepspeed_estimates": []}
    for preset in args.presets:
        counts = count_parameters(preset)
        out["counts"][preset] = {"groups": counts.groups, "total": counts.total,
                                 "largest_module": counts.largest_module,
                                 "trainable": {s: counts.trainable(s) for s in STAGE_PLANS}}
        print(f"{preset}: {counts.total:,} parameters; " + ", ".join(
            f"{g} {n:,}" for g, n in counts.groups.items() if n) + f"; largest module {counts.largest_module:,}")
        out["plans"] += plan_rows(counts, args.gpus, configs)
        for n in args.gpus:
            for offload in (False, True):
                out["deepspeed_estimates"].append({"preset": preset, **deepspeed_estimate(counts, n, offload)})
    print()
    print(table(out["plans"]))
    print("\nDeepSpeed's estimate_zero3_model_states_mem_needs (every parameter trainable, zero.Init, 1.5x host "
          "buffer factor):")
    for e in out["deepspeed_estimates"]:
        print(f"  {e['preset']:>15} {e['gpus']} GPU(s) offload={'cpu' if e['offload'] else 'none':4}: "
              f"{gib(e['device_bytes']):7.2f} GiB per GPU, {gib(e['host_per_node_bytes']):7.2f} GiB host per node")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
        print(f"\nwritten to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
