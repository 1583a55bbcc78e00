"""``ptscale grid``: the paper's tables from one command: arms x seeds x tasks at equal budgets, the
representation analysis, and table 2, table 1, figure 4, paired PT-X minus X deltas and the retention table.

    ptscale grid --out docs/findings [--arms prefix lora ... | --arm 'lora lora.r=8'] [--seeds 0 1 2]
                 [--tasks downstream vqa] [--epochs 5] [--first-share 0.6] [--set key=value ...]

Each run is ``launchers/train.py`` in a subprocess (one rank, no DeepSpeed launcher), so a grid run is exactly
what a user gets from the same overrides; its directory is ``OUT/runs/<task>/<arm>/seed<k>``. A run whose
``results.json`` holds its last stage's evaluation is finished and skipped when the grid is started again; an
unfinished one (killed mid-way) is started afresh. Then, per task, ``ptscale analyze`` over every run (the
reference: the pre-trained backbone), and the tables from the saved files only.

Equal budgets: every arm trains ``--epochs`` passes in all. A two-stage plan gives ``--first-share`` of them to
its first stage and the rest to the second; stages that take their settings from the same method (``lora->prefix``
trains both stages with ``methods.lora``) share the budget equally. Learning rates are each method's own, tuned
on the embedded default (``RATES``); batch sizes are the recipe's ``methods.*`` (``--set`` changes either for every
arm).

The pre-trained row is the backbone's own evaluation ("before training") in the first arm's first seed of each
task; the ceiling row is full fine-tuning on the broad pre-training distribution itself (``pretrain`` task,
the same budget, one seed per grid seed), i.e. what the model can reach when nothing is narrow.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ptscale.errors import RecipeError, TrainingStopped
from ptscale.plans import plan_layout, plan_methods

log = logging.getLogger("ptscale")

PAPER_ARMS = ("prefix", "lora", "adapter", "full", "prefix->lora", "prefix->adapter", "prefix->full",
              "prefix+lora", "lora->prefix")
# Adapters where LoRA sits (Q-Former and language model), at LoRA's parameter count: the default LoRA (r 16 on
# q/k/v of both towers' self-attention) has 36,864 parameters (paper table 2 compares at matched budgets).
ADAPTER_DEFAULT = ("adapter.kind=sequential", "adapter.components=[qformer,language_model]", "adapter.budget=36864")
# Each method's learning rate on the embedded default, tuned per method alone (docs/findings/lr-sweep.md): an arm
# trained at a rate chosen for another method is under-trained, and "PT-X beats X" then only says which arm got
# the better rate. config.py's defaults suit real checkpoints (full fine-tuning at 1e-3 would wreck one), so the
# grid, which always trains the embedded default, carries its own; --set and an arm's overrides come after them.
RATES = ("methods.prefix.lr=1e-2", "methods.lora.lr=1e-2", "methods.adapter.lr=5e-3", "methods.full.lr=1e-3")
CEILING = "ceiling"
PRETRAINED = "pre-trained"
GROUP_NAMES = {"test": "downstream test", "gen": "generalisation", "ret": "retention (pre-training distribution)"}
# The headline metrics of the Markdown tables (every metric is in the CSV), per task kind and group.
HEADLINE = {"caption": ("Bleu_4", "CIDEr", "AttrAcc"), "vqa": ("VQA_accuracy", "AttrAcc")}
PATH_NAMES = {"vision": "ViT", "qformer": "Q-Former", "text": "LM (text)"}


# --- Arms and budgets --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Arm:
    """A plan with overrides; ``name`` is what it is called in tables and directories."""

    plan: str
    overrides: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return " ".join((self.plan, *self.overrides))

    @property
    def slug(self) -> str:
        keep = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in self.name.replace("->", "-then-")
                       .replace("+", "-plus-").replace(" ", "__"))
        return keep[:120]


def parse_arm(spec: str) -> Arm:
    """``'prefix->lora methods.lora.lr=1e-4'``: a plan, then key=value overrides."""
    parts = shlex.split(spec)
    if not parts:
        raise RecipeError("--arm: empty; give a plan, optionally followed by key=value overrides")
    plan_layout(parts[0])  # a RecipeError naming the plan when it is not one
    for item in parts[1:]:
        if "=" not in item:
            raise RecipeError(f"--arm {spec!r}: {item!r} is not key=value")
    return Arm(parts[0], tuple(parts[1:]))


def budget_overrides(plan: str, epochs: float, first_share: float) -> list[str]:
    """``methods.<m>.epochs=...`` so that the plan's stages add up to ``epochs`` passes."""
    layout = plan_layout(plan)
    if len(layout) == 1:
        per_stage = [epochs]
    else:
        rest = epochs * (1 - first_share) / (len(layout) - 1)
        per_stage = [epochs * first_share] + [rest] * (len(layout) - 1)
    by_method: dict[str, list[float]] = {}
    for (method, _, _), e in zip(layout, per_stage, strict=True):
        by_method.setdefault(method, []).append(e)
    # a method feeding several stages gives each the same epochs: their mean keeps the total
    return [f"methods.{m}.epochs={sum(es) / len(es):g}" for m, es in by_method.items()]


def first_stage_quiet(plan: str) -> list[str]:
    """Evaluate only at the end (the table is of final weights): switch off the first stage's evaluation when
    it takes its settings from a method the last stage does not use."""
    layout = plan_layout(plan)
    first, last = layout[0][0], layout[-1][0]
    return [f"methods.{first}.evaluate=false"] if len(layout) > 1 and first != last else []


@dataclass
class GridSpec:
    out: Path
    arms: list[Arm]
    seeds: list[int]
    tasks: list[str]
    epochs: float = 5.0
    first_share: float = 0.6
    common: list[str] = field(default_factory=list)  # --set: for every run
    ceiling: bool = True
    analysis_samples: int | None = None
    parallel: int = 1  # --jobs: runs trained at once

    def run_dir(self, task: str, arm: Arm, seed: int) -> Path:
        return self.out / "runs" / task / arm.slug / f"seed{seed}"

    def ceiling_arm(self) -> Arm:
        return Arm("full")


def common_for(plan: str, common: list[str]) -> list[str]:
    """The ``--set`` overrides that concern ``plan``: a recipe refuses settings for a method or a part the plan
    does not use (``methods.prefix.*`` next to ``plan=lora``), while a grid's common settings name them all."""
    methods = set(plan_methods(plan))
    groups = {g for _, train, _ in plan_layout(plan) for g in train}
    keep = []
    for item in common:
        key = item.split("=", 1)[0]
        section, _, rest = key.partition(".")
        if section == "methods" and rest.split(".")[0] not in methods:
            continue
        if section in ("prefix", "lora", "adapter") and section not in groups:
            continue
        keep.append(item)
    return keep


def train_overrides(spec: GridSpec, task: str, arm: Arm, seed: int, *, before: bool) -> list[str]:
    run_dir = spec.run_dir(task, arm, seed)
    adapter = list(ADAPTER_DEFAULT) if "adapter" in arm.plan and not any(o.startswith("adapter.")
                                                                         for o in arm.overrides) else []
    return [f"output_dir={run_dir.parent}", f"run_name={run_dir.name}", f"seed={seed}", f"data.task={task}",
            f"plan={arm.plan}", *budget_overrides(arm.plan, spec.epochs, spec.first_share),
            *first_stage_quiet(arm.plan), f"eval.before_training={'true' if before else 'false'}",
            "checkpoint.every_steps=0", "checkpoint.keep_last=1", *adapter, *common_for(arm.plan, list(RATES)),
            *common_for(arm.plan, spec.common),
            *arm.overrides]


def train_command(overrides: list[str]) -> list[str]:
    launcher = Path(__file__).resolve().parents[1] / "launchers" / "train.py"
    script = [str(launcher)] if launcher.is_file() else ["-m", "ptscale.cli", "train"]
    return [sys.executable, *script, "--quiet", *overrides]


def shown_command(command: list[str]) -> list[str]:
    """A run's command as a reader repeats it: ``python``, and paths under the working directory relative to it
    (the tables are committed; this machine's absolute paths mean nothing elsewhere)."""
    cwd = Path.cwd()

    def rel(item: str) -> str:
        key, eq, value = item.partition("=") if item.startswith("output_dir=") else ("", "", item)
        path = Path(value)
        if path.is_absolute() and path.is_relative_to(cwd):
            value = path.relative_to(cwd).as_posix()
        return f"{key}{eq}{value}"

    return ["python", *(rel(c) for c in command[1:])]


def is_finished(run_dir: Path) -> bool:
    """results.json holds the evaluation of the run's last stage."""
    try:
        results = json.loads((run_dir / "results.json").read_text())
        from ptscale.config import load_recipe

        cfg = load_recipe(run_dir / "recipe.yaml", user_file=False)
    except (OSError, ValueError, RecipeError):
        return False
    last = len(cfg.stages) - 1
    return any(e.get("stage_index") == last for e in results.get("evaluations", []))


# --- Running -------------------------------------------------------------------------------------------------

@dataclass
class Job:
    task: str
    arm: Arm
    seed: int
    run_dir: Path
    command: list[str]
    role: str = "arm"  # or "ceiling"


def jobs(spec: GridSpec) -> list[Job]:
    out = []
    # seed-major: a grid stopped part-way has every arm of its first seeds (paired comparisons stay possible)
    for task in spec.tasks:
        for s, seed in enumerate(spec.seeds):
            for a, arm in enumerate(spec.arms):
                overrides = train_overrides(spec, task, arm, seed, before=a == 0 and s == 0)
                out.append(Job(task, arm, seed, spec.run_dir(task, arm, seed), train_command(overrides)))
    if spec.ceiling:
        arm = spec.ceiling_arm()
        for seed in spec.seeds:
            overrides = train_overrides(spec, "pretrain", arm, seed, before=False)
            out.append(Job(CEILING, arm, seed, spec.run_dir("pretrain", arm, seed), train_command(overrides),
                           role="ceiling"))
    return out


def _log_path(job: Job, log_dir: Path) -> Path:
    return log_dir / f"{job.run_dir.relative_to(log_dir.parent / 'runs').as_posix().replace('/', '__')}.log"


def _run_one(job: Job, log_dir: Path, threads: int | None) -> dict[str, Any]:
    """Train one job in its subprocess; TrainingStopped naming its log when it fails."""
    if job.run_dir.exists():  # killed mid-way: this grid owns the directory, start it again
        log.warning("grid: %s is unfinished (no final evaluation); starting it again", job.run_dir)
        shutil.rmtree(job.run_dir)
    log_path = _log_path(job, log_dir)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads is not None:  # concurrent runs share the cores instead of each taking them all
        env["OMP_NUM_THREADS"] = str(threads)
    started = time.time()
    with log_path.open("w") as out:
        code = subprocess.call(job.command, stdout=out, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        tail = log_path.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise TrainingStopped(f"grid: run {job.run_dir} failed (exit {code}): {tail[0]}; full log: {log_path}")
    return {"run_dir": str(job.run_dir), "seconds": round(time.time() - started, 1)}


def run_jobs(todo: list[Job], log_dir: Path, parallel: int = 1) -> dict[str, Any]:
    """Run each unfinished job, ``parallel`` at a time; returns {"ran", "skipped", "seconds"}.

    With ``parallel`` > 1 the first unfinished job runs alone (it may build the cached backbone every other run
    then reads), the rest ``parallel`` at a time, each with ``cores // parallel`` threads. A failure stops the
    grid once the runs in flight are done: no new run starts after it."""
    t0 = time.time()
    skipped = [str(j.run_dir) for j in todo if is_finished(j.run_dir)]
    pending = [j for j in todo if str(j.run_dir) not in skipped]
    threads = max(1, (os.cpu_count() or 1) // parallel) if parallel > 1 else None
    ran: list[dict[str, Any]] = []
    if pending:
        job = pending[0]
        log.info("grid [1/%d]: %s, %s, seed %d", len(pending), job.task, job.arm.name, job.seed)
        ran.append(_run_one(job, log_dir, threads))
    failure: TrainingStopped | None = None
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = {}
        for i, job in enumerate(pending[1:], start=2):
            log.info("grid [%d/%d]: %s, %s, seed %d", i, len(pending), job.task, job.arm.name, job.seed)
            futures[pool.submit(_run_one, job, log_dir, threads)] = job
            if len(futures) >= parallel:  # wait for a free slot, stopping at the first failure
                done, _ = wait(futures, return_when=FIRST_COMPLETED)
                failure = failure or _collect(done, futures, ran)
                if failure is not None:
                    break
        done, _ = wait(futures)
        failure = failure or _collect(done, futures, ran)
    if failure is not None:
        raise failure
    return {"ran": ran, "skipped": skipped, "seconds": round(time.time() - t0, 1)}


def _collect(done, futures: dict, ran: list[dict[str, Any]]) -> TrainingStopped | None:
    """Move finished futures' results into ``ran``; the first failure among them, if any."""
    failure = None
    for future in done:
        futures.pop(future)
        try:
            ran.append(future.result())
        except TrainingStopped as e:
            failure = failure or e
    return failure


def analyse(spec: GridSpec, task: str, run_dirs: list[Path]) -> Path:
    from ptscale.analysis.analyze import AnalyzeRequest, analyze_runs

    out = spec.out / "analysis" / task
    analyze_runs(AnalyzeRequest(run_dirs=run_dirs, samples=spec.analysis_samples, out_dir=out))
    return out / "analysis.json"


# --- Reading results ---------------------------------------------------------------------------------------

@dataclass
class RunResult:
    task: str
    arm: str
    label: str  # plan and placement (ptscale.labels.run_label)
    seed: int
    metrics: dict[str, float]  # the final evaluation's metrics
    pretrained: dict[str, float] | None  # the "before training" evaluation, when the run made one
    ranks: dict[str, dict[str, Any]]  # path -> analysis entry of this run (effective rank, curve, ...)


def read_run(job: Job, analysis: dict[str, Any] | None) -> RunResult:
    from ptscale.config import load_recipe
    from ptscale.labels import run_label

    cfg = load_recipe(job.run_dir / "recipe.yaml", user_file=False)
    evaluations = json.loads((job.run_dir / "results.json").read_text())["evaluations"]
    before = next((e["metrics"] for e in evaluations if e["point"] == "before training"), None)
    ranks: dict[str, dict[str, Any]] = {}
    for model in (analysis or {}).get("models", []):
        if model.get("run_dir") and Path(model["run_dir"]).resolve() == job.run_dir.resolve():
            ranks = model["paths"]
    name = CEILING if job.role == "ceiling" else job.arm.name
    return RunResult(job.task, name, run_label(cfg), job.seed, evaluations[-1]["metrics"], before, ranks)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, s


def scale(metric: str, value: float) -> float:
    """As the paper prints them: caption scores and attribute accuracy x100; VQA accuracy is in percent."""
    return value if metric.split("/")[-1].startswith("VQA") else 100 * value


def _fmt(values: Sequence[float], metric: str) -> str:
    m, s = mean_std([scale(metric, v) for v in values])
    return f"{m:.1f} ± {s:.1f}" if len(values) > 1 else f"{m:.1f}"


def _group_metric(group: str, metric: str) -> str:
    return metric if group == "test" else f"{group}/{metric}"


def _kind(task: str) -> str:
    from ptscale.data.synthetic import KIND

    return KIND.get(task, "caption")


# --- Tables ------------------------------------------------------------------------------------------------

def _md(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def _by_arm(results: list[RunResult], task: str) -> dict[str, list[RunResult]]:
    out: dict[str, list[RunResult]] = {}
    for r in results:
        if r.task == task:
            out.setdefault(r.arm, []).append(r)
    return out


def table2(results: list[RunResult], ceiling: list[RunResult], tasks: list[str]) -> tuple[str, list[dict]]:
    """Markdown per task (headline metrics per group, mean ± std over seeds) and tidy CSV rows (every metric)."""
    from ptscale.data.synthetic import EVAL_GROUPS

    md, rows = [], []
    for task in tasks:
        arms = _by_arm(results, task)
        if not arms:
            continue
        kind = _kind(task)
        columns = [(g, m) for g in EVAL_GROUPS for m in HEADLINE[kind]]
        header = ["arm", "placement", "seeds", *(f"{g} {m}" for g, m in columns)]
        body = []
        pre = next((r.pretrained for rs in arms.values() for r in rs if r.pretrained), None)
        if pre:
            body.append([PRETRAINED, "backbone as pre-trained", "-",
                         *(_fmt([pre[_group_metric(g, m)]], m) if _group_metric(g, m) in pre else "n/a"
                           for g, m in columns)])
            rows += [{"task": task, "arm": PRETRAINED, "label": "pre-trained backbone", "seed": "-",
                      "metric": k, "value": v} for k, v in pre.items()]
        for arm, rs in arms.items():
            cells = []
            for g, m in columns:
                key = _group_metric(g, m)
                values = [r.metrics[key] for r in rs if key in r.metrics]
                cells.append(_fmt(values, m) if values else "n/a")
            body.append([arm, rs[0].label.partition(" (")[2].rstrip(")") or "-", str(len(rs)), *cells])
            rows += [{"task": task, "arm": arm, "label": r.label, "seed": r.seed, "metric": k, "value": v}
                     for r in rs for k, v in r.metrics.items()]
        if ceiling and kind == "caption":
            ret = [(g, m) for g, m in columns if g == "ret"]
            cells = {f"ret {m}": _fmt([r.metrics[m] for r in ceiling if m in r.metrics], m) for _, m in ret}
            body.append([CEILING, "full FT on the pre-training distribution", str(len(ceiling)),
                         *(cells.get(f"{g} {m}", "-") for g, m in columns)])
            rows += [{"task": "pretrain", "arm": CEILING, "label": r.label, "seed": r.seed, "metric": k, "value": v}
                     for r in ceiling for k, v in r.metrics.items()]
        groups = ", ".join(f"{g}: {GROUP_NAMES[g]}" for g in EVAL_GROUPS)
        md.append(f"### Task `{task}`\n\nMean ± std over seeds (x100; VQA accuracy in %). Groups: {groups}.\n\n"
                  + _md(header, body))
    return "\n".join(md), rows


def crossing(entry: dict[str, Any], threshold: float) -> float:
    import torch

    from ptscale.analysis.effective_rank import crossing_point

    return crossing_point(torch.tensor(entry["cumulative"], dtype=torch.float64), threshold)


def table1(results: list[RunResult], analyses: dict[str, dict[str, Any]], tasks: list[str]
           ) -> tuple[str, list[dict]]:
    """Effective rank per tower as % of the pre-trained model's (at the analysis threshold), and the continuous
    crossing point as % of the pre-trained model's."""
    md, rows = [], []
    for task in tasks:
        doc = analyses.get(task)
        arms = _by_arm(results, task)
        if not doc or not arms:
            continue
        threshold = doc["threshold"]
        ref = doc["models"][0]["paths"]
        header = ["arm", *(f"{PATH_NAMES[p]} eff. rank %" for p in ref), *(f"{PATH_NAMES[p]} crossing %" for p in ref)]
        body = [[PRETRAINED, *(f"100 ({ref[p]['effective_rank']}/{ref[p]['length']})" for p in ref),
                 *(f"100 ({100 * crossing(ref[p], threshold):.1f}% of M)" for p in ref)]]
        for arm, rs in arms.items():
            rs = [r for r in rs if r.ranks]
            if not rs:
                continue
            pct = {p: [r.ranks[p]["percent_of_reference"] for r in rs] for p in ref}
            cross = {p: [100 * crossing(r.ranks[p], threshold) / crossing(ref[p], threshold) for r in rs] for p in ref}
            body.append([arm, *(_pm(pct[p]) for p in ref), *(_pm(cross[p]) for p in ref)])
            for r in rs:
                for p in ref:
                    rows.append({"task": task, "arm": arm, "seed": r.seed, "path": p,
                                 "effective_rank": r.ranks[p]["effective_rank"], "length": r.ranks[p]["length"],
                                 "percent_of_pretrained": r.ranks[p]["percent_of_reference"],
                                 "crossing_percent_of_pretrained": 100 * crossing(r.ranks[p], threshold)
                                 / crossing(ref[p], threshold)})
        md.append(f"### Task `{task}` ({doc['data']['size']} evaluation samples, threshold {threshold})\n\n"
                  + _md(header, body))
    return "\n".join(md), rows


def _pm(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{m:.1f} ± {s:.1f}" if len(values) > 1 else f"{m:.1f}"


def deltas(results: list[RunResult], tasks: list[str]) -> tuple[str, list[dict]]:
    """Paired by seed: PT-X minus X for X in lora, adapter, full (and prefix+X minus X), per headline metric."""
    from ptscale.data.synthetic import EVAL_GROUPS

    md, rows = [], []
    for task in tasks:
        arms = _by_arm(results, task)
        kind = _kind(task)
        metrics = [_group_metric(g, m) for g in EVAL_GROUPS for m in HEADLINE[kind]]
        body = []
        for x in ("lora", "adapter", "full"):
            # every arm of a PT plan of X, with or without overrides of its own (e.g. X's whole budget after the
            # prefix stage), against X as the grid trains it
            order = (f"prefix->{x}", f"prefix+{x}", f"{x}->prefix")
            pts = sorted((a for a in arms if a.split(" ", 1)[0] in order), key=lambda a: order.index(a.split(" ")[0]))
            for pt in pts:
                if x not in arms:
                    continue
                base = {r.seed: r.metrics for r in arms[x]}
                pairs = [(r.metrics, base[r.seed]) for r in arms[pt] if r.seed in base]
                cells = []
                for m in metrics:
                    d = [scale(m, a[m]) - scale(m, b[m]) for a, b in pairs if m in a and m in b]
                    if not d:
                        cells.append("n/a")
                        continue
                    mean, std = mean_std(d)
                    pos, neg = sum(v > 0 for v in d), sum(v < 0 for v in d)
                    cells.append(f"{mean:+.1f} ± {std:.1f} ({pos}+/{neg}-)")
                    rows.append({"task": task, "comparison": f"{pt} - {x}", "metric": m, "mean": mean, "std": std,
                                 "positive": pos, "negative": neg, "pairs": len(d)})
                body.append([f"{pt} − {x}", str(len(pairs)), *cells])
        if body:
            md.append(f"### Task `{task}`\n\nPaired by seed (x100; VQA in points); in brackets how many seeds the "
                      "difference is positive / negative.\n\n" + _md(["comparison", "pairs", *metrics], body))
    return "\n".join(md), rows


def retention(results: list[RunResult], tasks: list[str]) -> str:
    """What the pre-training distribution (``ret``) and the generalisation split keep, relative to the
    pre-trained model's own score: the forgetting the paper blames on narrow downstream data."""
    md = []
    for task in tasks:
        arms = _by_arm(results, task)
        kind = _kind(task)
        pre = next((r.pretrained for rs in arms.values() for r in rs if r.pretrained), None)
        if not pre:
            continue
        metrics = [m for g in ("ret", "gen") for m in (_group_metric(g, x) for x in HEADLINE[kind]) if m in pre]
        body = [[PRETRAINED, *(f"{scale(m, pre[m]):.1f}" for m in metrics)]]
        for arm, rs in arms.items():
            cells = []
            for m in metrics:
                values = [scale(m, r.metrics[m]) - scale(m, pre[m]) for r in rs if m in r.metrics]
                mean, std = mean_std(values) if values else (float("nan"), 0.0)
                cells.append(f"{mean:+.1f} ± {std:.1f}")
            body.append([arm, *cells])
        md.append(f"### Task `{task}`\n\nPre-trained score, then each arm's change from it (mean ± std over seeds)."
                  "\n\n" + _md(["arm", *metrics], body))
    return "\n".join(md)


def figure4(results: list[RunResult], analyses: dict[str, dict[str, Any]], out: Path, tasks: list[str]) -> list[Path]:
    import torch

    from ptscale.analysis.effective_rank import plot_spectrum_bands

    paths = []
    for task in tasks:
        doc = analyses.get(task)
        if not doc:
            continue
        ref = doc["models"][0]
        panels: dict[str, dict[str, list]] = {}
        for p in ref["paths"]:
            curves = {f"{PRETRAINED}": [torch.tensor(ref["paths"][p]["cumulative"])]}
            for arm, rs in _by_arm(results, task).items():
                ys = [torch.tensor(r.ranks[p]["cumulative"]) for r in rs if r.ranks]
                if ys:
                    curves[f"{arm}: {rs[0].label.partition(' (')[2].rstrip(')') or arm}"] = ys
            panels[PATH_NAMES[p]] = curves
        paths.append(plot_spectrum_bands(panels, out / f"figure4_{task}.png", threshold=doc["threshold"],
                                         reference=PRETRAINED,
                                         title=f"Figure 4 on task {task}: mean over seeds, band = seed range"))
    return paths


def _csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_tables(spec: GridSpec, all_jobs: list[Job], analyses: dict[str, dict[str, Any]], timing: dict[str, Any],
                 argv: list[str]) -> Path:
    from ptscale.checkpoint import write_text_atomic

    results = [read_run(j, analyses.get(j.task)) for j in all_jobs if j.role == "arm"]
    ceiling = [read_run(j, None) for j in all_jobs if j.role == "ceiling"]
    t2, rows2 = table2(results, ceiling, spec.tasks)
    t1, rows1 = table1(results, analyses, spec.tasks)
    td, rowsd = deltas(results, spec.tasks)
    tr = retention(results, spec.tasks)
    figures = figure4(results, analyses, spec.out, spec.tasks)
    for name, rows in (("table2", rows2), ("table1", rows1), ("deltas", rowsd)):
        write_text_atomic(spec.out / f"{name}.csv", _csv(rows))
    commands = "\n".join(shlex.join(shown_command(j.command)) for j in all_jobs)
    write_text_atomic(spec.out / "commands.txt", "# the grid\n" + shlex.join(argv) + "\n# its runs\n" + commands + "\n")
    figs = "\n".join(f"![figure 4, {p.stem}]({p.name})" for p in figures)
    text = (f"# PT-PEFT findings on the embedded default\n\nProduced by `{shlex.join(argv)}` "
            f"(every run's command: `commands.txt`). Arms: {len(spec.arms)}, seeds: {spec.seeds}, tasks: "
            f"{spec.tasks}, {spec.epochs:g} epochs per arm in all. Runs trained this time: {len(timing['ran'])} "
            f"({timing['seconds']:.0f} s), skipped as finished: {len(timing['skipped'])}."
            + (f" **Not finished, left out (a partial grid):** {', '.join(timing['missing'])}."
               if timing.get("missing") else "") + "\n\n"
            f"## Table 2: scores\n\n{t2}\n## Paired differences: PT-X minus X\n\n{td}\n"
            f"## Retention and generalisation, relative to the pre-trained model\n\n{tr}\n"
            f"## Table 1: effective rank of the last-layer features\n\n{t1}\n## Figure 4\n\n{figs}\n")
    write_text_atomic(spec.out / "findings.md", text)
    return spec.out / "findings.md"


def run_grid(spec: GridSpec, argv: list[str], tables_only: bool = False) -> Path:
    """Train what is unfinished (unless ``tables_only``), analyse, and write the tables of the finished runs."""
    all_jobs = jobs(spec)
    if tables_only:
        missing = [j for j in all_jobs if not is_finished(j.run_dir)]
        for j in missing:
            log.warning("grid --tables-only: %s (%s, seed %d) is not finished; left out of the tables",
                        j.run_dir, j.arm.name, j.seed)
        all_jobs = [j for j in all_jobs if j not in missing]
        if not any(j.role == "arm" for j in all_jobs):
            raise RecipeError(f"grid --tables-only: no finished run under {spec.out / 'runs'}; run the grid first")
        timing = {"ran": [], "skipped": [str(j.run_dir) for j in all_jobs], "seconds": 0.0,
                  "missing": [f"{j.task}/{j.arm.name}/seed{j.seed}" for j in missing]}
    else:
        timing = run_jobs(all_jobs, spec.out / "logs", spec.parallel)
    analyses = {}
    for task in spec.tasks:
        dirs = [j.run_dir for j in all_jobs if j.task == task and j.role == "arm"]
        if not dirs:
            continue
        log.info("grid: representation analysis of %d runs of task %s", len(dirs), task)
        analyses[task] = json.loads(analyse(spec, task, dirs).read_text())
    return write_tables(spec, all_jobs, analyses, timing, argv)


# --- Command line ------------------------------------------------------------------------------------------

def add_grid_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="grid directory (runs, logs, analysis, tables)")
    p.add_argument("--arms", nargs="+", default=None, metavar="PLAN",
                   help=f"plans to compare (default: the paper's {', '.join(PAPER_ARMS)})")
    p.add_argument("--arm", action="append", default=[], metavar="'PLAN key=value ...'",
                   help="an arm with its own overrides (repeatable; added to --arms)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--tasks", nargs="+", default=["downstream"], help="synthetic tasks (default: downstream)")
    p.add_argument("--epochs", type=float, default=5.0, help="training passes per arm in all (default 5)")
    p.add_argument("--first-share", type=float, default=0.6,
                   help="share of the passes a two-stage plan's first stage gets (default 0.6: 3 of 5)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="common",
                   help="a recipe override for every run (repeatable); methods.<m>.*, prefix.*, lora.* and adapter.* "
                        "reach only the arms whose plan uses them")
    p.add_argument("--no-ceiling", action="store_true", help="skip the ceiling row (full FT on the broad data)")
    p.add_argument("--tables-only", action="store_true",
                   help="train nothing: analyse and tabulate the finished runs only, naming the missing ones")
    p.add_argument("--analysis-samples", type=int, default=None,
                   help="evaluation samples the spectra are computed on (default: all of the suite)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once, each with cores/jobs threads (default 1); the first runs alone")


def grid_spec(args: argparse.Namespace) -> GridSpec:
    from ptscale.config import load_recipe

    arms = [Arm(p) for p in (args.arms if args.arms is not None else ([] if args.arm else PAPER_ARMS))]
    arms += [parse_arm(a) for a in args.arm]
    for a in arms:
        plan_layout(a.plan)
    if len({a.slug for a in arms}) != len(arms):
        raise RecipeError("--arms/--arm: an arm is given twice")
    if not 0 < args.first_share < 1:
        raise RecipeError(f"--first-share: must be in (0, 1), got {args.first_share}")
    if args.epochs <= 0:
        raise RecipeError(f"--epochs: must be > 0, got {args.epochs}")
    if args.jobs < 1:
        raise RecipeError(f"--jobs: must be >= 1, got {args.jobs}")
    spec = GridSpec(args.out, arms, list(args.seeds), list(args.tasks), args.epochs, args.first_share,
                    list(args.common), not args.no_ceiling, args.analysis_samples, args.jobs)
    # every run's recipe is checked before the first one trains (a typo fails now, not an hour in); quietly:
    # each run logs its own notes (e.g. "prefix.lengths ignored") when it starts
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        for job in jobs(spec):
            overrides = [o for o in job.command[job.command.index("--quiet") + 1:]
                         if not o.startswith(("output_dir=", "run_name="))]
            load_recipe(None, overrides)
    finally:
        log.setLevel(level)
    return spec


def run_grid_command(args: argparse.Namespace) -> int:
    spec = grid_spec(args)
    t0 = time.time()
    path = run_grid(spec, ["ptscale", "grid", *_argv_of(args)], args.tables_only)
    print(f"grid: {time.time() - t0:.0f} s; tables and figures: {path.parent} ({path.name})")
    return 0


def _argv_of(args: argparse.Namespace) -> list[str]:
    """The grid's own options, as a command line (for the tables' header)."""
    out = ["--out", str(args.out)]
    if args.arms is not None:
        out += ["--arms", *args.arms]
    for a in args.arm:
        out += ["--arm", a]
    out += ["--seeds", *map(str, args.seeds), "--tasks", *args.tasks, "--epochs", f"{args.epochs:g}",
            "--first-share", f"{args.first_share:g}"]
    for c in args.common:
        out += ["--set", c]
    if args.no_ceiling:
        out.append("--no-ceiling")
    if args.tables_only:
        out.append("--tables-only")
    if args.analysis_samples is not None:
        out += ["--analysis-samples", str(args.analysis_samples)]
    if args.jobs != 1:
        out += ["--jobs", str(args.jobs)]
    return out
