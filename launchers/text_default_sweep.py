"""The text default's comparison (seed 001's question): prefix, Prefix-Tuning+, LoRA, prefix->LoRA and
Prefix-Tuning+->LoRA on the tiny pre-trained Llama, at equal budgets (the same number of optimizer steps and
batch size in all; a two-stage plan splits them evenly), over several seeds, each run launched as a user does.

    python launchers/text_default_sweep.py --out runs/text-sweep --seeds 0 1 2 [--steps 600] [--ds CONFIG]

Writes sweep.json (every run's final metrics and wall time) and sweep.md (mean and spread per method), and
prints the table. The backbone is pre-trained once (cached) before the first run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "ptscale" / "recipes" / "text-default.yaml"
# method -> (plan, prefix.kind): the plan's stages share the step budget evenly
METHODS = {
    "prefix": ("prefix", "classic"),
    "plus": ("prefix", "plus"),
    "lora": ("lora", None),
    "prefix->lora": ("prefix->lora", "classic"),
    "plus->lora": ("prefix->lora", "plus"),
}
METRICS = ("exact_match", "loss", "perplexity")


def recipe(method: str, steps: int, seed: int, out: Path) -> dict:
    plan, kind = METHODS[method]
    raw = yaml.safe_load(BASE.read_text())
    stages = plan.split("->")
    raw["plan"] = plan
    raw["methods"] = {m: {**raw["methods"].get(m, {}), "steps": steps // len(stages)} for m in stages}
    if kind is not None:
        raw["prefix"] = {"kind": kind}
    raw.update(seed=seed, output_dir=str(out), run_name=f"{method.replace('->', '-')}-seed{seed}")
    return raw


def run(method: str, steps: int, seed: int, out: Path, ds: str | None = None, threads: int = 1) -> dict:
    path = out / f"{method.replace('->', '-')}-seed{seed}.yaml"
    path.write_text(yaml.safe_dump(recipe(method, steps, seed, out), sort_keys=False))
    t0 = time.time()
    cmd = [sys.executable, "launchers/train.py", "--recipe", str(path), "--quiet", *(["--ds", ds] if ds else [])]
    # threads per run: on a shared CPU, more OpenMP threads than free cores slow a run down many times over
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if proc.returncode != 0:
        raise SystemExit(f"{path}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    results = json.loads((out / path.stem / "results.json").read_text())
    final = results["evaluations"][-1]
    return {"method": method, "seed": seed, "wall_s": time.time() - t0, "trainable": final["trainable"],
            "metrics": final["metrics"], "before": results["evaluations"][0]["metrics"]}


def collect(out: Path) -> list[dict]:
    """The rows of the runs already finished in ``out`` (``--collect``: a sweep cut short, or run in parts); wall
    time from the run's recipe file (written just before launch) to its results.json."""
    rows = []
    for path in sorted(out.glob("*-seed*.yaml")):
        results = path.parent / path.stem / "results.json"
        if not results.is_file():
            continue
        cfg = yaml.safe_load(path.read_text())
        method = next(m for m in METHODS if m.replace("->", "-") == path.stem.rsplit("-seed", 1)[0])
        evaluations = json.loads(results.read_text())["evaluations"]
        if len(evaluations) < 1 + len(METHODS[method][0].split("->")):
            continue  # still running
        rows.append({"method": method, "seed": cfg["seed"], "wall_s": results.stat().st_mtime - path.stat().st_mtime,
                     "trainable": evaluations[-1]["trainable"], "metrics": evaluations[-1]["metrics"],
                     "before": evaluations[0]["metrics"]})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| method | trainable | exact match % (mean ± sd) | loss (mean ± sd) | runs |",
             "|---|---|---|---|---|"]
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        em = [100 * r["metrics"]["exact_match"] for r in mine]
        loss = [r["metrics"]["loss"] for r in mine]
        sd = (lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0)  # noqa: E731
        per_seed = ", ".join(f"{x:.1f}" for x in em)
        lines.append(f"| {method} | {mine[0]['trainable']:,} | {statistics.mean(em):.1f} ± {sd(em):.1f} "
                     f"({per_seed}) | {statistics.mean(loss):.3f} ± {sd(loss):.3f} | {len(mine)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per run (split across stages)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (OMP_NUM_THREADS)")
    parser.add_argument("--ds", default=None, help="DeepSpeed config (default: the launcher's, ZeRO-3)")
    parser.add_argument("--collect", action="store_true", help="only tabulate the finished runs in --out (a sweep "
                        "started again skips them)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows, t0 = [], time.time()
    done = {(r["method"], r["seed"]) for r in collect(args.out)}  # a sweep started again continues
    for seed in [] if args.collect else args.seeds:
        for method in args.methods:
            if (method, seed) in done:
                continue
            rows.append(run(method, args.steps, seed, args.out, args.ds, args.threads))
            print(f"{method} seed {seed}: exact match {rows[-1]['metrics']['exact_match']:.3f}, "
                  f"{rows[-1]['wall_s']:.0f} s", flush=True)
    rows = collect(args.out)  # every finished run, also those of an earlier, interrupted sweep
    text = table(rows)
    record = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "steps": args.steps,
              "seeds": args.seeds, "ds": args.ds or "ds_configs/zero3.json", "threads": args.threads,
              "command": " ".join([sys.executable, *sys.argv]), "rows": rows,
              "wall_s": sum(r["wall_s"] for r in rows), "this_invocation_s": time.time() - t0}
    (args.out / "sweep.json").write_text(json.dumps(record, indent=1))
    (args.out / "sweep.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
