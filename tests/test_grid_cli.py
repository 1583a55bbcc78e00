"""A real (tiny) grid through the command line: two arms, one seed, a few steps each; started again, it
trains nothing and rewrites the tables from the saved runs."""

from __future__ import annotations

import csv
import json

import pytest

from tests.launch import cli

TINY = ["--set", "data.train_size=8", "--set", "data.eval_size=2", "--set", "eval.num_beams=1",
        "--set", "eval.max_new_tokens=4", "--set", "methods.prefix.batch_size=4", "--set", "methods.lora.batch_size=4"]


@pytest.mark.slow
def test_a_tiny_grid_runs_resumes_and_writes_its_tables(tmp_path) -> None:
    out = tmp_path / "grid"
    args = ["grid", "--out", str(out), "--arms", "lora", "prefix->lora", "--seeds", "0", "--epochs", "1",
            "--no-ceiling", "--analysis-samples", "2", *TINY]
    first = cli("-m", "ptscale.cli", *args, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"tables and figures: {out}" in first.stdout
    runs = sorted(p.parent for p in out.glob("runs/downstream/*/seed0/results.json"))
    assert [p.parent.name for p in runs] == ["lora", "prefix-then-lora"]
    for run in runs:  # equal budgets: one pass in all, whatever the plan
        stages = json.loads((run / "results.json").read_text())["evaluations"]
        assert stages[-1]["point"] in ("lora", "prefix+lora")
    findings = (out / "findings.md").read_text()
    assert "| pre-trained |" in findings and "| prefix->lora − lora | 1 |" in findings
    assert {r["arm"] for r in csv.DictReader((out / "table1.csv").open())} == {"lora", "prefix->lora"}
    assert (out / "figure4_downstream.png").is_file() and "launchers/train.py" in (out / "commands.txt").read_text()

    again = cli("-m", "ptscale.cli", *args, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "grid [" not in again.stderr  # every run was finished: none trained again
    assert "skipped as finished: 2" in (out / "findings.md").read_text()
