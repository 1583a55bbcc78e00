"""``ptscale report``: the table-2 style markdown of saved runs."""

from __future__ import annotations

import json
import shutil

from ptscale.cli import main
from ptscale.config import load_recipe
from ptscale.report import COLUMNS, method_name, render_report, short_reason, stage_label
from tests.runs_fixture import analysed_runs  # noqa: F401


def _rows(markdown: str) -> list[dict[str, str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert tuple(cells[0]) == COLUMNS
    return [dict(zip(COLUMNS, row, strict=True)) for row in cells[1:]]


def test_report_of_two_analysed_runs(analysed_runs, tmp_path, capsys):  # noqa: F811
    runs, _ = analysed_runs
    out = tmp_path / "report.md"
    assert main(["report", str(runs.a), str(runs.b), "--out", str(out)]) == 0
    text = out.read_text()
    assert capsys.readouterr().out == text
    rows = {r["Run"]: r for r in _rows(text)}
    assert rows["a"]["Method"] == "prefix -> prefix+lora" and rows["b"]["Method"] == "prefix"
    for run in runs.all:
        row = rows[run.name]
        final = json.loads((run / "results.json").read_text())["evaluations"][-1]
        assert row["Trainable"] == f"{100 * final['trainable'] / final['total']:.2f} %"
        assert row["B4"] == f"{100 * final['metrics']['Bleu_4']:.1f}"
        assert row["C"] == f"{100 * final['metrics']['CIDEr']:.1f}"
        if "SPICE" in final["metrics"]:
            assert row["S"] == f"{100 * final['metrics']['SPICE']:.1f}"
        else:  # shortened in the cell, in full under the table
            assert row["S"].startswith("n/a: ") and final["unavailable"]["SPICE"] in text
        assert row["VQA acc."] == "n/a: captioning run"
        analysis = json.loads((run / "analysis.json").read_text())["models"][1]["paths"]
        assert row["Eff. rank (% of ref.)"] == " / ".join(
            f"{letter} {analysis[p]['percent_of_reference']:.1f}" for p, letter in
            (("vision", "v"), ("qformer", "q"), ("text", "t")))
    # b trains the prefix only, a adds LoRA: a larger trainable share.
    assert float(rows["a"]["Trainable"].rstrip(" %")) > float(rows["b"]["Trainable"].rstrip(" %"))


def test_stage_labels_are_the_names_results_are_recorded_under(analysed_runs):  # noqa: F811
    runs, _ = analysed_runs
    for run in runs.all:
        cfg = load_recipe(run / "recipe.yaml")
        points = [e["point"] for e in json.loads((run / "results.json").read_text())["evaluations"]]
        assert points[-1] == stage_label(cfg.stages[-1], len(cfg.stages) - 1)
        assert method_name(cfg).split(" -> ")[-1] == points[-1]


def test_missing_analysis_and_results_are_named(analysed_runs, tmp_path):  # noqa: F811
    runs, _ = analysed_runs
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(runs.b / "recipe.yaml", bare / "recipe.yaml")  # no results.json, no analysis.json
    text = render_report([bare])
    row = _rows(text)[0]
    assert row["Method"] == "prefix" and row["B4"] == row["C"] == "n/a"
    assert row["Eff. rank (% of ref.)"] == "n/a: not analysed"
    assert "no results.json" in text and "ptscale analyze" in text


def test_short_reasons():
    assert short_reason("SPICE needs lib/x.jar in /p (...); not present, so SPICE was not computed") == \
        "CoreNLP jars missing"
    assert short_reason("disabled by the caller (spice=False)") == "disabled"
    assert short_reason("SPICE jars present but SPICE failed: exit 1") == "failed"
    long = short_reason("an unexpected and rather long explanation of what went wrong")
    assert len(long) <= 32 and long.endswith("…")
