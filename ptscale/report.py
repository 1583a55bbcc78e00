"""``ptscale report RUN_DIR ... [--out report.md]``: a markdown table of runs in the layout of the paper's table 2.

One row per run (named by its directory): the method (its stage names in order, e.g.
``prefix -> prefix+lora``), the trainable share of the last stage, BLEU-4, CIDEr and SPICE (x100, as in the
paper) from the run's ``results.json``, VQA accuracy (n/a for captioning runs) and the effective rank from the
run's ``analysis.json`` (``ptscale analyze``) as a percentage of the reference's, per analysed path
(v = vision encoder, q = Q-Former, t = text; table 1).
A metric that could not be computed shows ``n/a: <short reason>``; the full reasons follow the table.

Reads only recipe.yaml, results.json and analysis.json: no model, no torch.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ptscale.config import RunConfig, StageConfig, load_recipe

VQA_METRIC = "VQA_accuracy"  # the key a VQA evaluation records in results.json (percent)
PATH_LETTERS = {"vision": "v", "qformer": "q", "text": "t"}
COLUMNS = ("Run", "Method", "Trainable", "B4", "C", "S", "VQA acc.", "Eff. rank (% of ref.)")


def stage_label(stage: StageConfig, index: int) -> str:
    """The name a stage's evaluation is recorded under; the same rule as ``training.recipe.stage_name``
    (not imported: that module pulls in DeepSpeed, and a report needs no model)."""
    return stage.name or f"stage{index + 1}-" + "+".join(stage.train)


def method_name(cfg: RunConfig) -> str:
    return " -> ".join(stage_label(s, i) for i, s in enumerate(cfg.stages))


def short_reason(reason: str, limit: int = 32) -> str:
    """A table-cell version of an unavailable-metric reason; the full text goes under the table."""
    lowered = reason.lower()
    for needle, short in (("not present", "CoreNLP jars missing"), ("disabled", "disabled"),
                          ("failed", "failed"), ("`java`", "no java")):
        if needle in lowered:
            return short
    first = reason.split(";")[0].split(". ")[0].strip()
    return first if len(first) <= limit else first[: limit - 1].rstrip() + "…"


@dataclass
class RunRow:
    run_dir: Path
    method: str
    cells: dict[str, str]
    notes: dict[str, str] = field(default_factory=dict)  # column -> full reason of an n/a


def _final_evaluation(cfg: RunConfig, results: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The last stage's evaluation (and a note when an earlier point had to stand in for it)."""
    evaluations = results.get("evaluations", [])
    last = len(cfg.stages) - 1
    for e in evaluations:
        if e.get("stage_index") == last:
            return e, ""
    if evaluations:
        return evaluations[-1], f" (evaluated at {evaluations[-1]['point']})"
    return None, ""


def _metric_cell(metrics: dict[str, float], unavailable: dict[str, str], name: str,
                 notes: dict[str, str], column: str) -> str:
    if name in metrics:
        return f"{100 * metrics[name]:.1f}"
    reason = unavailable.get(name, f"{name} not in results.json")
    notes[column] = reason
    return f"n/a: {short_reason(reason)}"


def _rank_cell(run_dir: Path, notes: dict[str, str]) -> str:
    path = run_dir / "analysis.json"
    if not path.is_file():
        notes["Eff. rank (% of ref.)"] = "no analysis.json in the run directory; run `ptscale analyze RUN_DIR`"
        return "n/a: not analysed"
    document = json.loads(path.read_text())
    mine = [m for m in document["models"] if m["role"] == "run" and m.get("run_dir")
            and Path(m["run_dir"]).resolve() == run_dir.resolve()]
    if not mine:
        notes["Eff. rank (% of ref.)"] = f"{path} has no entry for this run"
        return "n/a: not analysed"
    paths = mine[-1]["paths"]
    return " / ".join(f"{PATH_LETTERS.get(p, p)} {paths[p]['percent_of_reference']:.1f}" for p in paths)


def run_row(run_dir: str | Path) -> RunRow:
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}: no recipe.yaml; point at a run directory written by launchers/train.py")
    cfg = load_recipe(run_dir / "recipe.yaml")
    results_path = run_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    evaluation, where = _final_evaluation(cfg, results)
    notes: dict[str, str] = {}
    method = method_name(cfg) + where
    if evaluation is None:
        reason = "no evaluation in results.json" if results else "no results.json (the run has not evaluated)"
        cells = dict.fromkeys(COLUMNS[2:7], "n/a")
        notes["B4"] = reason
    else:
        metrics, unavailable = evaluation["metrics"], evaluation.get("unavailable", {})
        total = evaluation.get("total") or 0
        cells = {"Trainable": f"{100 * evaluation['trainable'] / total:.2f} %" if total else "n/a",
                 "B4": _metric_cell(metrics, unavailable, "Bleu_4", notes, "B4"),
                 "C": _metric_cell(metrics, unavailable, "CIDEr", notes, "C"),
                 "S": _metric_cell(metrics, unavailable, "SPICE", notes, "S")}
        if VQA_METRIC in metrics:
            cells["VQA acc."] = f"{metrics[VQA_METRIC]:.1f}"
        else:
            cells["VQA acc."] = "n/a: captioning run" if "CIDEr" in metrics else "n/a: not evaluated"
    cells["Eff. rank (% of ref.)"] = _rank_cell(run_dir, notes)
    return RunRow(run_dir, method, {"Run": run_dir.name, "Method": method, **cells}, notes)


def markdown_table(rows: list[RunRow]) -> str:
    cells = [[row.cells[c] for c in COLUMNS] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(COLUMNS)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(COLUMNS), sep, *map(line, cells)])


def render_report(run_dirs: list[str | Path]) -> str:
    rows = [run_row(p) for p in run_dirs]
    parts = [markdown_table(rows), "",
             "B4, C, S: BLEU-4, CIDEr, SPICE x100 at the last stage (results.json). Trainable: that stage's "
             "trainable / all parameters. Eff. rank: effective rank at the analysis threshold as % of the "
             "reference model's (analysis.json); v = vision encoder, q = Q-Former, t = text."]
    # The same reason for several runs is listed once, with the runs it applies to.
    reasons: dict[tuple[str, str], list[str]] = {}
    for row in rows:
        for column, reason in row.notes.items():
            reasons.setdefault((column, reason), []).append(row.run_dir.name)
    if reasons:
        parts += ["", "n/a:"]
        parts += [f"- {column} ({', '.join(names)}): {reason}" for (column, reason), names in reasons.items()]
    return "\n".join(parts) + "\n"


def add_report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories, one row each")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown here (e.g. report.md)")


def run_report_command(args: argparse.Namespace) -> int:
    text = render_report(args.run_dirs)
    print(text, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0
