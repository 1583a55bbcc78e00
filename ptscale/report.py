"""``ptscale report RUN_DIR ... [--out FILE] [--format md|csv|latex]``: saved runs side by side, with what
it takes to judge whether they are comparable.

One row per run and evaluation point (``before training``, then each evaluated stage), in the order the run
evaluated them, so a run's last row is its final result (the paper's table 2). Per row:
- what was trained: the plan (``run.json``, else the recipe's ``# plan:`` header), the seed, the stages in
  order (``prefix -> prefix+lora``) and their length (epochs, or optimizer steps when a stage sets them),
  the point's optimizer step and its trainable share of all parameters;
- how it was evaluated: data source (and synthetic task), split, number of examples, beams. Recorded per
  evaluation in ``results.json`` (``settings``); runs that predate that record fall back to their
  recipe.yaml, marked as such. Rows whose settings differ from the most common ones are flagged in the
  ``Differs`` column, and a line under the table names every setting that differs and its values;
- every metric recorded (BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE x100 as in the paper; VQA accuracy in
  percent); one that could not be computed shows ``n/a: <short reason>``, the full reasons follow the table;
- the effective rank of the final weights (``analysis.json``, ``ptscale analyze``) as a percentage of the
  reference's per analysed path (v = vision encoder, q = Q-Former, t = text; table 1), on each run's last row.

Markdown (default, also on stdout), CSV (tidy: one line per run x evaluation point x metric) or LaTeX (a
tabular). Reads only recipe.yaml, run.json, results.json and analysis.json: no model, no torch.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ptscale.config import RecipeError, RunConfig, StageConfig, load_recipe
from ptscale.labels import placement, run_label

VQA_METRIC = "VQA_accuracy"  # the key a VQA evaluation records in results.json (percent)
PATH_LETTERS = {"vision": "v", "qformer": "q", "text": "t"}
RANK_COLUMN = "Eff. rank (% of ref.)"
# Known metrics in table order, with their column names; BLEU-4, CIDEr, SPICE and VQA accuracy (the paper's
# table 2) always get a column, the others when some run recorded them. Unknown metrics follow by name.
METRIC_COLUMNS = {"Bleu_1": "B1", "Bleu_2": "B2", "Bleu_3": "B3", "Bleu_4": "B4", "METEOR": "M",
                  "ROUGE_L": "R", "CIDEr": "C", "SPICE": "S", VQA_METRIC: "VQA acc.",
                  "loss": "Loss", "perplexity": "PPL", "exact_match": "EM"}
ALWAYS = ("Bleu_4", "CIDEr", "SPICE", VQA_METRIC)
TEXT_METRIC = "perplexity"  # recorded by every text evaluation (ptscale.eval.text): the mark of a text run
UNSCALED = (VQA_METRIC, "loss", "perplexity")  # printed as recorded (VQA in percent; loss in nats)
RUN_COLUMNS = ("Run", "Plan", "Placement", "Seed", "Method", "Length", "Point", "Step", "Trainable", "Eval data",
               "Split", "N", "Beams", "Differs")
COLUMNS = RUN_COLUMNS + tuple(METRIC_COLUMNS[m] for m in ALWAYS) + (RANK_COLUMN,)  # the narrowest table
# The evaluation settings two rows must share to be compared, and how the table names them.
COMPARED = {"data": "data", "task": "synthetic task", "split": "split", "size": "size", "num_beams": "beams",
            "max_new_tokens": "max_new_tokens", "min_new_tokens": "min_new_tokens"}
FORMATS = {".md": "md", ".markdown": "md", ".csv": "csv", ".tex": "latex"}
RECIPE_MARK = "†"  # on settings read from recipe.yaml rather than recorded with the evaluation


class ReportError(ValueError):
    """A run directory or option the report cannot use; the message names the file and the fix."""


def stage_label(stage: StageConfig, index: int) -> str:
    """The name a stage's evaluation is recorded under; the same rule as ``training.recipe.stage_name``
    (not imported: that module pulls in DeepSpeed, and a report needs no model)."""
    return stage.name or f"stage{index + 1}-" + "+".join(stage.train)


def method_name(cfg: RunConfig) -> str:
    return " -> ".join(stage_label(s, i) for i, s in enumerate(cfg.stages))


def stage_length(stage: StageConfig) -> str:
    """Steps override epochs when a stage sets them (as in training)."""
    return f"{stage.steps} steps" if stage.steps else f"{stage.epochs:g} ep"


def short_reason(reason: str, limit: int = 32) -> str:
    """A table-cell version of an unavailable-metric reason; the full text goes under the table."""
    lowered = reason.lower()
    for needle, short in (("not present", "CoreNLP jars missing"), ("disabled", "disabled"),
                          ("failed", "failed"), ("`java`", "no java")):
        if needle in lowered:
            return short
    first = reason.split(";")[0].split(". ")[0].strip()
    return first if len(first) <= limit else first[: limit - 1].rstrip() + "…"


# --- Reading a run ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    """How one evaluation was made; ``source`` says where the values were read (not compared)."""

    data: str
    task: str | None  # the synthetic task; None for real datasets (their data file says it all)
    split: str
    size: int | str  # "all" when the recipe's cap is 0 and the recorded count is unknown
    num_beams: int
    max_new_tokens: int
    min_new_tokens: int
    source: str  # "results.json" or "recipe.yaml"

    def key(self) -> tuple:
        return tuple(getattr(self, k) for k in COMPARED)


def recipe_settings(cfg: RunConfig) -> Settings:
    """The evaluation settings a recipe implies (for runs whose results.json does not record them)."""
    d = cfg.data
    if d.name == "synthetic":
        split, size = "eval", d.eval_size
    elif d.name == "vqav2":
        split, size = Path(d.vqa_eval_questions or "?").name, d.eval_size or "all"
    else:
        split, size = d.eval_split, d.eval_size or "all"
    return Settings(d.name, d.task if d.name == "synthetic" else None, split, size, cfg.eval.num_beams,
                    cfg.eval.max_new_tokens, cfg.eval.min_new_tokens, "recipe.yaml")


def recorded_settings(recorded: dict[str, Any], fallback: Settings) -> Settings:
    """``settings`` of a results.json evaluation; a key it lacks comes from the recipe (marked so)."""
    values = {k: recorded.get(k, getattr(fallback, k)) for k in COMPARED}
    if values["data"] != "synthetic":
        values["task"] = None
    source = "results.json" if all(k in recorded for k in COMPARED if k != "task") else "recipe.yaml"
    return Settings(**values, source=source)


@dataclass
class Run:
    run_dir: Path
    cfg: RunConfig
    plan: str | None
    seed: int
    evaluations: list[dict[str, Any]]
    no_evaluation: str  # why there is none (when evaluations is empty)
    ranks: dict[str, float]  # analysed path -> effective rank of the final weights, % of the reference's
    rank_note: str = ""  # why ranks is empty

    @property
    def rank_cell(self) -> str:
        if not self.ranks:
            return "n/a: not analysed"
        return " / ".join(f"{PATH_LETTERS.get(p, p)} {v:.1f}" for p, v in self.ranks.items())

    @property
    def name(self) -> str:
        return self.run_dir.name


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ReportError(f"{path}: cannot be read as JSON ({e}); rerun or remove the run from the report") \
            from None


def _plan_from_header(recipe_text: str) -> str | None:
    """``# plan: prefix->lora (expanded into the stages below)``, the first line of a saved recipe."""
    first = recipe_text.splitlines()[0] if recipe_text else ""
    if first.startswith("# plan: "):
        return first[len("# plan: "):].split(" (expanded")[0].strip() or None
    return None


def load_run(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir)
    recipe = run_dir / "recipe.yaml"
    if not recipe.is_file():
        raise ReportError(f"{run_dir}: no recipe.yaml; point at a run directory written by launchers/train.py")
    try:
        cfg = load_recipe(recipe, user_file=False)  # a run's saved recipe: every key resolved
    except RecipeError as e:
        raise ReportError(f"{recipe}: {e}") from None
    meta = _read_json(run_dir / "run.json") if (run_dir / "run.json").is_file() else {}
    plan = meta.get("plan") or cfg.plan or _plan_from_header(recipe.read_text())
    results_path = run_dir / "results.json"
    results = _read_json(results_path) if results_path.is_file() else None
    evaluations = list(results.get("evaluations", [])) if results else []
    why = "no evaluation in results.json" if results else "no results.json (the run has not evaluated)"
    ranks, rank_note = _ranks(run_dir)
    return Run(run_dir, cfg, plan, int(meta.get("seed", cfg.seed)), evaluations, why, ranks, rank_note)


def _ranks(run_dir: Path) -> tuple[dict[str, float], str]:
    """Per analysed path, the run's effective rank as % of the reference's; or why there is none."""
    path = run_dir / "analysis.json"
    if not path.is_file():
        return {}, "no analysis.json in the run directory; run `ptscale analyze RUN_DIR`"
    document = _read_json(path)
    mine = [m for m in document["models"] if m["role"] == "run" and m.get("run_dir")
            and Path(m["run_dir"]).resolve() == run_dir.resolve()]
    if not mine:
        return {}, f"{path} has no entry for this run"
    return {p: v["percent_of_reference"] for p, v in mine[-1]["paths"].items()}, ""


# --- Rows ---------------------------------------------------------------------------------------------------

@dataclass
class Row:
    """One evaluation point of one run (or the single row of a run without any)."""

    run: Run
    evaluation: dict[str, Any] | None
    settings: Settings
    final: bool  # the run's last evaluation: carries the effective rank
    differs: list[str] = field(default_factory=list)  # compared settings that differ from the reference

    @property
    def point(self) -> str:
        return self.evaluation["point"] if self.evaluation else "-"

    @property
    def share(self) -> float | None:
        e = self.evaluation
        return e["trainable"] / e["total"] if e and e.get("total") else None


def rows_of(run: Run) -> list[Row]:
    fallback = recipe_settings(run.cfg)
    if not run.evaluations:
        return [Row(run, None, fallback, final=True)]
    last = len(run.evaluations) - 1
    return [Row(run, e, recorded_settings(e["settings"], fallback) if "settings" in e else fallback,
                final=i == last) for i, e in enumerate(run.evaluations)]


def flag_differences(rows: list[Row]) -> list[str]:
    """Mark each row with the settings in which it differs from the most common settings (ties: the
    earliest row's); return one line per differing setting with the values and the runs showing them."""
    if not rows:
        return []
    counts = Counter(r.settings.key() for r in rows)
    top = max(counts.values())
    reference = next(r.settings for r in rows if counts[r.settings.key()] == top)
    lines = []
    for key, label in COMPARED.items():
        values: dict[Any, list[str]] = {}
        for r in rows:
            value = getattr(r.settings, key)
            if value != getattr(reference, key):
                r.differs.append(label)
            names = values.setdefault(value, [])
            if r.run.name not in names:
                names.append(r.run.name)
        if len(values) > 1:
            lines.append(f"- {label}: " + "; ".join(f"{_text(v)} ({', '.join(n)})" for v, n in values.items()))
    return lines


def _is_text(row: Row) -> bool:
    return bool(row.evaluation) and TEXT_METRIC in row.evaluation.get("metrics", {})


def metric_names(rows: list[Row]) -> list[str]:
    seen = set() if rows and all(map(_is_text, rows)) else set(ALWAYS)  # a text-only report: no caption columns
    for r in rows:
        if r.evaluation:
            seen |= set(r.evaluation.get("metrics", {})) | set(r.evaluation.get("unavailable", {}))
    known = [m for m in METRIC_COLUMNS if m in seen]
    return known + sorted(seen - set(METRIC_COLUMNS))


def _text(value: Any) -> str:
    return "-" if value is None else str(value)


def _metric_value(name: str, value: float) -> float:
    """As the paper prints them: captioning scores (and exact match) x100; VQA accuracy is recorded in percent
    already; a loss and a perplexity are not fractions."""
    return value if name in UNSCALED else 100 * value


def _metric_cell(row: Row, name: str, notes: dict[tuple[str, str], list[str]]) -> str:
    column = METRIC_COLUMNS.get(name, name)
    if row.evaluation is None:
        if name == ALWAYS[0]:
            notes.setdefault((column, row.run.no_evaluation), []).append(row.run.name)
        return "n/a"
    metrics, unavailable = row.evaluation.get("metrics", {}), row.evaluation.get("unavailable", {})
    if name in metrics:
        return f"{_metric_value(name, metrics[name]):.{3 if name in ('loss', 'perplexity') else 1}f}"
    if TEXT_METRIC in metrics:
        return "n/a: text run" if name in ALWAYS else "-"
    if name == VQA_METRIC:
        return "n/a: captioning run" if "CIDEr" in metrics else "n/a: not evaluated"
    if VQA_METRIC in metrics:
        return "n/a: VQA run" if name in ALWAYS else "-"
    if name in unavailable:
        notes.setdefault((column, unavailable[name]), []).append(row.run.name)
        return f"n/a: {short_reason(unavailable[name])}"
    if name in ALWAYS:
        reason = f"{name} not in results.json"
        notes.setdefault((column, reason), []).append(row.run.name)
        return f"n/a: {short_reason(reason)}"
    return "-"  # a metric another row recorded (e.g. BLEU-1 beside a VQA run): not applicable here


def _settings_cell(row: Row, value: str) -> str:
    return value + RECIPE_MARK if row.settings.source == "recipe.yaml" else value


def cells(row: Row, metrics: list[str], notes: dict[tuple[str, str], list[str]]) -> dict[str, str]:
    run, s, e = row.run, row.settings, row.evaluation
    out = {"Run": run.name, "Plan": run.plan or "-", "Placement": placement(run.cfg) or "-", "Seed": str(run.seed),
           "Method": method_name(run.cfg),
           "Length": " -> ".join(stage_length(st) for st in run.cfg.stages), "Point": row.point,
           "Step": _text(e.get("global_step")) if e else "-",
           "Trainable": f"{100 * row.share:.2f} %" if row.share is not None else "n/a",
           "Eval data": _settings_cell(row, s.data + (f":{s.task}" if s.task else "")),
           "Split": _settings_cell(row, s.split), "N": _settings_cell(row, str(s.size)),
           "Beams": _settings_cell(row, str(s.num_beams)),
           "Differs": ("≠ " + ", ".join(row.differs)) if row.differs else ""}
    out.update({METRIC_COLUMNS.get(m, m): _metric_cell(row, m, notes) for m in metrics})
    if row.final:
        out[RANK_COLUMN] = run.rank_cell
        if run.rank_note:
            notes.setdefault((RANK_COLUMN, run.rank_note), []).append(run.name)
    else:
        out[RANK_COLUMN] = ""  # the analysis is of the final weights only
    return out


# --- Rendering -------------------------------------------------------------------------------------------

@dataclass
class Table:
    header: list[str]
    body: list[dict[str, str]]
    differences: list[str]  # lines naming what differs
    notes: dict[tuple[str, str], list[str]]  # (column, full n/a reason) -> runs
    any_from_recipe: bool
    rows: list[Row]
    metrics: list[str]


def build_table(run_dirs: list[str | Path]) -> Table:
    rows = [r for d in run_dirs for r in rows_of(load_run(d))]
    differences = flag_differences(rows)
    metrics = metric_names(rows)
    notes: dict[tuple[str, str], list[str]] = {}
    body = [cells(r, metrics, notes) for r in rows]
    header = [*RUN_COLUMNS, *(METRIC_COLUMNS.get(m, m) for m in metrics), RANK_COLUMN]
    return Table(header, body, differences, notes, any(r.settings.source == "recipe.yaml" for r in rows),
                 rows, metrics)


LEGEND = ("Point: the evaluation (before training, or after the named stage); Step: optimizer steps done "
          "when it was evaluated (results.json's global_step); Length: each stage's epochs, or steps where it "
          "sets them. Trainable: trainable / all parameters at that point. Eval data, Split, N, Beams: how it "
          "was evaluated. B1-B4, M, R, C, S: BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE x100; VQA acc. in %. "
          "Text: Loss (nats per completion token), PPL = exp(Loss), EM: exact match x100. "
          "Eff. rank: effective rank of the final weights at the analysis threshold as % of the reference "
          "model's (analysis.json; on each run's last "
          "row); v = vision encoder, q = Q-Former, t = text.")


def _notes(table: Table) -> list[str]:
    parts = []
    if table.differences:
        parts += ["", "Not comparable: evaluation settings differ (rows marked in Differs, against the most "
                  "common settings):", *table.differences]
    if table.any_from_recipe:
        parts += ["", f"{RECIPE_MARK} evaluation settings read from recipe.yaml: the run's results.json does not "
                  "record them (written before they were recorded)."]
    if table.notes:
        # The same reason for several runs is listed once, with the runs it applies to.
        parts += ["", "n/a:"]
        parts += [f"- {column} ({', '.join(dict.fromkeys(names))}): {reason}"
                  for (column, reason), names in table.notes.items()]
    return parts


def markdown(table: Table) -> str:
    cells_ = [[row[c] for c in table.header] for row in table.body]
    widths = [max(len(h), *(len(r[i]) for r in cells_)) for i, h in enumerate(table.header)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(table.header), sep, *map(line, cells_), "", LEGEND, *_notes(table)]) + "\n"


CSV_FIELDS = ("run", "run_dir", "plan", "seed", "method", "stage_lengths", "point", "stage_index", "global_step",
              "trainable", "total", "trainable_share", "data", "task", "split", "size", "num_beams",
              "max_new_tokens", "min_new_tokens", "settings_source", "differs", "metric", "value",
              "unavailable")


def csv_text(table: Table) -> str:
    """Tidy: one line per run x evaluation point x metric; values as recorded (0-1 scores, VQA in %),
    effective rank as metric ``eff_rank_pct:<path>`` on the final point. An absent metric has an empty value
    and its reason in ``unavailable``."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in table.rows:
        run, s, e = row.run, row.settings, row.evaluation or {}
        base = {"run": run.name, "run_dir": str(run.run_dir), "plan": run.plan or "", "seed": run.seed,
                "method": method_name(run.cfg),
                "stage_lengths": " -> ".join(stage_length(st) for st in run.cfg.stages),
                "point": e.get("point", ""), "stage_index": e.get("stage_index", ""),
                "global_step": e.get("global_step", ""), "trainable": e.get("trainable", ""),
                "total": e.get("total", ""), "trainable_share": "" if row.share is None else row.share,
                "data": s.data, "task": s.task or "", "split": s.split, "size": s.size, "num_beams": s.num_beams,
                "max_new_tokens": s.max_new_tokens, "min_new_tokens": s.min_new_tokens,
                "settings_source": s.source, "differs": ";".join(row.differs)}
        for line in _csv_metrics(row, table.metrics):
            writer.writerow({**base, **line})
    return buf.getvalue()


def _csv_metrics(row: Row, metrics: list[str]) -> list[dict[str, Any]]:
    if row.evaluation is None:
        return [{"metric": "", "value": "", "unavailable": row.run.no_evaluation}]
    recorded, unavailable = row.evaluation.get("metrics", {}), row.evaluation.get("unavailable", {})
    out = [{"metric": m, "value": recorded.get(m, ""), "unavailable": unavailable.get(m, "")}
           for m in metrics if m in recorded or m in unavailable]
    if row.final:
        out += _csv_ranks(row.run)
    return out


def _csv_ranks(run: Run) -> list[dict[str, Any]]:
    if run.rank_note:
        return [{"metric": "eff_rank_pct", "value": "", "unavailable": run.rank_note}]
    return [{"metric": f"eff_rank_pct:{p}", "value": v, "unavailable": ""} for p, v in run.ranks.items()]


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                 "≠": r"$\neq$", "†": r"\dag{}", "…": r"\ldots{}", "->": r"$\rightarrow$"}


def latex_escape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text.startswith("->", i):
            out.append(LATEX_SPECIAL["->"])
            i += 2
            continue
        out.append(LATEX_SPECIAL.get(text[i], text[i]))
        i += 1
    return "".join(out)


def latex(table: Table) -> str:
    """A plain ``tabular`` (no packages needed), then the legend and notes as paragraphs."""
    spec = "l" * len(RUN_COLUMNS) + "r" * (len(table.header) - len(RUN_COLUMNS))
    row = lambda values: " & ".join(latex_escape(v) for v in values) + r" \\"  # noqa: E731
    tabular = [r"\begin{tabular}{" + spec + "}", r"\hline", row(table.header), r"\hline",
               *(row([r[c] for c in table.header]) for r in table.body), r"\hline", r"\end{tabular}"]
    # A blank line between notes: LaTeX would run consecutive lines into one paragraph.
    notes = [latex_escape(p) for p in [LEGEND, *_notes(table)] if p]
    return "\n".join(tabular) + "\n\n" + "\n\n".join(notes) + "\n"


RENDERERS = {"md": markdown, "csv": csv_text, "latex": latex}
PRETRAINED_ROW = "pre-trained"


def _mean_std(values: list[float]) -> str:
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5  # sample std (n - 1)
    return f"{mean:.1f} ± {std:.1f}"


def aggregate(table: Table) -> str:
    """Markdown: one row per method (plan and placement) and evaluation point, every metric as mean ± std over
    the runs (seeds) in it; every run's "before training" evaluation (the pre-trained model) in one first row.
    Rows of runs evaluated differently stay apart (their settings are part of the key)."""
    groups: dict[tuple, list[Row]] = {}
    for r in table.rows:
        if r.evaluation is None:
            continue
        pre = r.point == "before training"
        key = ((PRETRAINED_ROW, "") if pre else (run_label(r.run.cfg), r.point)) + r.settings.key()
        groups.setdefault(key, []).append(r)
    ordered = sorted(groups.items(), key=lambda kv: kv[0][0] != PRETRAINED_ROW)  # stable: run order otherwise
    header = ["Method (plan and placement)", "Point", "Seeds", "Eval data", "N",
              *(METRIC_COLUMNS.get(m, m) for m in table.metrics)]
    body = []
    for (label, point, *_), rows in ordered:
        s = rows[0].settings
        cells = []
        for m in table.metrics:
            values = [_metric_value(m, r.evaluation["metrics"][m]) for r in rows
                      if m in r.evaluation.get("metrics", {})]
            cells.append(_mean_std(values) if values else "n/a")
        seeds = sorted({r.run.seed for r in rows})
        body.append([label, point or "-", ",".join(map(str, seeds)), s.data + (f":{s.task}" if s.task else ""),
                     str(s.size), *cells])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
             *("| " + " | ".join(b) + " |" for b in body)]
    note = ("Mean ± sample std over the runs in each row (x100 as in the paper; VQA accuracy in %). The "
            f"{PRETRAINED_ROW} row gathers every run's evaluation before training (the backbone itself).")
    return "\n".join([*lines, "", note]) + "\n"


def render_report(run_dirs: list[str | Path], fmt: str = "md", aggregated: bool = False) -> str:
    table = build_table(run_dirs)
    if aggregated:
        if fmt != "md":
            raise ReportError("--aggregate writes Markdown; drop --format/--out's .csv/.tex (ptscale grid writes "
                              "aggregated CSV)")
        return aggregate(table)
    return RENDERERS[fmt](table)


# --- CLI -------------------------------------------------------------------------------------------------

def add_report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                   help="run directories; one row per run and evaluation point")
    p.add_argument("--out", type=Path, default=None,
                   help="also write the report here; .md, .csv or .tex sets the format unless --format does")
    p.add_argument("--format", choices=sorted(RENDERERS), default=None,
                   help="md (default), csv (one line per run x evaluation point x metric) or latex (a tabular)")
    p.add_argument("--aggregate", action="store_true",
                   help="one row per method (plan and placement) and evaluation point: mean ± std over seeds, "
                        "with one pre-trained row (Markdown)")


def report_format(fmt: str | None, out: Path | None) -> str:
    if fmt is not None:
        return fmt
    if out is None:
        return "md"
    suffix = out.suffix.lower()
    if suffix not in FORMATS:
        raise ReportError(f"--out {out}: cannot tell the format from {suffix or 'no suffix'!r}; name the file "
                          f"{', '.join(FORMATS)} or pass --format {'|'.join(RENDERERS)}")
    return FORMATS[suffix]


def run_report_command(args: argparse.Namespace) -> int:
    """Prints the report (and writes --out); a run directory or option it cannot use is one line on stderr
    and exit 2, before anything is written."""
    try:
        text = render_report(args.run_dirs, report_format(args.format, args.out), args.aggregate)
    except ReportError as e:
        print(f"ptscale report: {e}", file=sys.stderr)
        return 2
    print(text, end="")
    if args.out is not None:
        from ptscale.checkpoint import write_text_atomic

        write_text_atomic(args.out, text)
    return 0
