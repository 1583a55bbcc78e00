"""``ptscale report``: saved runs side by side (markdown, CSV, LaTeX), one row per run and evaluation point,
with the settings that make them comparable and a flag where they differ.

The first tests read two runs trained through the CLI (tests/runs_fixture.py); the rest hand-write run
directories in the layout training writes (recipe.yaml, results.json, run.json, analysis.json), including
older runs that predate run.json and the recorded evaluation settings.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from ptscale.cli import main
from ptscale.config import EvalConfig, load_recipe, to_dict
from ptscale.report import COLUMNS, method_name, render_report, short_reason, stage_label
from tests.runs_fixture import analysed_runs  # noqa: F401


def _table(markdown: str) -> list[dict[str, str]]:
    """Rows of the markdown table, as dicts keyed by the header (which holds at least COLUMNS)."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert set(COLUMNS) <= set(cells[0]), cells[0]
    return [dict(zip(cells[0], row, strict=True)) for row in cells[1:]]


def _rows(markdown: str) -> list[dict[str, str]]:
    """Each run's last row (its final evaluation: the paper's table 2), in order of the runs."""
    return list({row["Run"]: row for row in _table(markdown)}.values())


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
    # Every evaluation point is a row; a's 48 and b's 45 evaluation images (3 groups of 16 / 15) are flagged as not
    # comparable.
    points = [(r["Run"], r["Point"]) for r in _table(text)]
    assert points == [(run.name, e["point"]) for run in runs.all
                      for e in json.loads((run / "results.json").read_text())["evaluations"]]
    assert rows["a"]["Differs"] == "" and rows["b"]["Differs"] == "≠ size"
    assert "- size: 48 (a); 45 (b)" in text


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


# --- Hand-written run directories ---------------------------------------------------------------------------

CAPTION_METRICS = {"Bleu_1": 0.61, "Bleu_2": 0.43, "Bleu_3": 0.32, "Bleu_4": 0.246, "METEOR": 0.343,
                   "ROUGE_L": 0.587, "CIDEr": 2.068}
SPICE_MISSING = {"SPICE": "SPICE needs lib/stanford-corenlp-3.6.0.jar in /x; not present, so SPICE was not "
                          "computed"}


def settings(size: int = 16, beams: int = 1, **kw: Any) -> dict[str, Any]:
    """An evaluation's ``settings`` as training records them in results.json."""
    return {"data": "synthetic", "task": "downstream", "split": "eval", "size": size, "num_beams": beams,
            "max_new_tokens": EvalConfig().max_new_tokens, "min_new_tokens": 1, **kw}


def evaluation(point: str, stage_index: int, step: int | None, trainable: int, *, scale: float = 1.0,
               recorded: dict[str, Any] | None = None, metrics: dict[str, float] | None = None) -> dict[str, Any]:
    e = {"point": point, "stage_index": stage_index, "trainable": trainable, "total": 1000,
         "metrics": metrics or {k: v * scale for k, v in CAPTION_METRICS.items()},
         "unavailable": {} if metrics else dict(SPICE_MISSING)}
    if step is not None:
        e["global_step"] = step
    if recorded is not None:
        e["settings"] = recorded
    return e


def write_run(root: Path, name: str, overrides: list[str], evaluations: list[dict[str, Any]] | None,
              run_json: dict[str, Any] | None = None) -> Path:
    """A run directory as training writes it: the resolved recipe (a plan expanded into stages, named in
    the header comment), results.json and, for runs of the current layout, run.json."""
    cfg = load_recipe(None, overrides)
    run = root / name
    run.mkdir(parents=True)
    head = f"# plan: {cfg.plan} (expanded into the stages below)\n" if cfg.plan else ""
    (run / "recipe.yaml").write_text(head + yaml.safe_dump({**to_dict(cfg), "plan": None}, sort_keys=False))
    if evaluations is not None:
        (run / "results.json").write_text(json.dumps({"run_dir": str(run), "world_size": 1,
                                                       "evaluations": evaluations}))
    if run_json is not None:
        (run / "run.json").write_text(json.dumps(run_json))
    return run


def current_run(root: Path, name: str, *, size: int = 16, beams: int = 1, seed: int = 0,
                plan: str = "prefix->lora", overrides: tuple[str, ...] = ()) -> Path:
    """Three evaluation points (before training, after each stage), settings recorded, run.json written."""
    recorded = settings(size, beams)
    evaluations = [evaluation("before training", -1, 0, 0, scale=0.1, recorded=recorded),
                   evaluation("prefix", 0, 96, 120, scale=0.8, recorded=recorded),
                   evaluation("prefix+lora", 1, 160, 150, recorded=recorded)]
    return write_run(root, name, [f"plan={plan}", f"seed={seed}", f"data.eval_size={size}",
                                  f"eval.num_beams={beams}", *overrides], evaluations,
                     {"plan": plan, "seed": seed, "backbone": {"path": "/cache/tiny", "digest": "abc"}})


def test_every_evaluation_point_is_a_row_with_its_settings(tmp_path: Path) -> None:
    run = current_run(tmp_path, "pt_lora", seed=7)
    table = _table(render_report([run]))
    assert [r["Point"] for r in table] == ["before training", "prefix", "prefix+lora"]
    assert [r["Step"] for r in table] == ["0", "96", "160"]
    assert [r["Trainable"] for r in table] == ["0.00 %", "12.00 %", "15.00 %"]
    for row, scale in zip(table, (0.1, 0.8, 1.0), strict=True):
        assert (row["Run"], row["Plan"], row["Seed"]) == ("pt_lora", "prefix->lora", "7")
        assert row["Method"] == "prefix -> prefix+lora" and row["Length"] == "3 ep -> 2 ep"  # the default recipe
        assert (row["Eval data"], row["Split"], row["N"], row["Beams"]) == ("synthetic:downstream", "eval", "16",
                                                                           "1")
        assert row["Differs"] == ""
        for name, column in (("Bleu_1", "B1"), ("Bleu_2", "B2"), ("Bleu_3", "B3"), ("Bleu_4", "B4"),
                             ("METEOR", "M"), ("ROUGE_L", "R"), ("CIDEr", "C")):
            assert row[column] == f"{100 * scale * CAPTION_METRICS[name]:.1f}"
        assert row["S"] == "n/a: CoreNLP jars missing" and row["VQA acc."] == "n/a: captioning run"
    # The analysis is of the final weights: on the last row only.
    assert [r["Eff. rank (% of ref.)"] for r in table] == ["", "", "n/a: not analysed"]


def test_differing_beams_and_sizes_are_flagged(tmp_path: Path) -> None:
    """The issue's case: a 64-image, 5-beam run beside 16-image, 1-beam runs."""
    big = current_run(tmp_path, "big", size=64, beams=5)
    small = [current_run(tmp_path, f"small{k}", seed=k) for k in (1, 2)]
    text = render_report([big, *small])
    table = _table(text)
    assert {r["Differs"] for r in table if r["Run"] == "big"} == {"≠ size, beams"}
    assert {r["Differs"] for r in table if r["Run"] != "big"} == {""}  # the most common settings
    assert [r["N"] for r in table] == ["64"] * 3 + ["16"] * 6 and [r["Beams"] for r in table] == ["5"] * 3 + ["1"] * 6
    assert "Not comparable: evaluation settings differ" in text
    assert "- size: 64 (big); 16 (small1, small2)" in text and "- beams: 5 (big); 1 (small1, small2)" in text
    assert "- split:" not in text and "- max_new_tokens:" not in text


def test_other_differing_settings_are_named(tmp_path: Path) -> None:
    a = current_run(tmp_path, "a")
    b = write_run(tmp_path, "b", ["seed=1"], [evaluation("prefix+lora", 1, 10, 150,
                                                         recorded=settings(max_new_tokens=48, task="pretrain"))],
                  {"plan": None, "seed": 1})
    text = render_report([a, b])
    assert {r["Differs"] for r in _table(text) if r["Run"] == "b"} == {"≠ synthetic task, max_new_tokens"}
    assert "- synthetic task: downstream (a); pretrain (b)" in text and "- max_new_tokens: 32 (a); 48 (b)" in text


def test_same_settings_are_not_flagged(tmp_path: Path) -> None:
    text = render_report([current_run(tmp_path, "a"), current_run(tmp_path, "b", plan="prefix", seed=3)])
    assert all(r["Differs"] == "" for r in _table(text)) and "Not comparable" not in text


def test_runs_older_than_run_json_fall_back_to_the_recipe(tmp_path: Path) -> None:
    """No run.json, no settings or global_step in results.json: plan from the recipe's header comment,
    seed and settings from the recipe, marked as read from it, and still compared."""
    old = write_run(tmp_path, "old", ["plan=prefix", "seed=5", "data.eval_size=64", "eval.num_beams=5",
                                      "methods.prefix.steps=200"],
                    [evaluation("before training", -1, None, 0), evaluation("prefix", 0, None, 120)])
    new = current_run(tmp_path, "new")
    text = render_report([old, new])
    rows = [r for r in _table(text) if r["Run"] == "old"]
    assert [r["Point"] for r in rows] == ["before training", "prefix"] and {r["Step"] for r in rows} == {"-"}
    row = rows[-1]
    assert (row["Plan"], row["Seed"], row["Method"], row["Length"]) == ("prefix", "5", "prefix", "200 steps")
    assert (row["Eval data"], row["Split"], row["N"], row["Beams"]) == ("synthetic:downstream†", "eval†", "64†",
                                                                       "5†")
    assert row["Differs"] == "≠ size, beams"  # the recorded run has 3 rows: its settings are the reference
    assert "† evaluation settings read from recipe.yaml" in text


def test_explicit_stages_without_plan(tmp_path: Path) -> None:
    run = write_run(tmp_path, "custom", ["plan=null", "stages=[{name: warm, train: [prefix], steps: 5}, "
                                         "{train: [prefix, lora], epochs: 1.5}]"],
                    [evaluation("stage2-prefix+lora", 1, 20, 150, recorded=settings())], {"plan": None, "seed": 0})
    row = _table(render_report([run]))[0]
    assert (row["Plan"], row["Method"], row["Length"]) == ("-", "warm -> stage2-prefix+lora", "5 steps -> 1.5 ep")


def test_vqa_run_beside_captioning_runs(tmp_path: Path) -> None:
    vqa = write_run(tmp_path, "vqa", ["plan=prefix"], [evaluation(
        "prefix", 0, 50, 120, metrics={"VQA_accuracy": 41.25},
        recorded=settings(data="vqav2", task="downstream", split="v2_questions_val.json", size=100))],
        {"plan": "prefix", "seed": 0})
    text = render_report([current_run(tmp_path, "cap"), vqa])
    row = _rows(text)[-1]
    assert row["VQA acc."] == "41.2" and row["B4"] == row["C"] == "n/a: VQA run" and row["B1"] == "-"
    assert (row["Eval data"], row["Split"]) == ("vqav2", "v2_questions_val.json")  # no synthetic task
    assert "- data: synthetic (cap); vqav2 (vqa)" in text


def _analysis(run: Path, percents: dict[str, float]) -> None:
    paths = {p: {"percent_of_reference": v} for p, v in percents.items()}
    (run / "analysis.json").write_text(json.dumps({"models": [
        {"role": "reference", "paths": {p: {"percent_of_reference": 100.0} for p in percents}},
        {"role": "run", "run_dir": str(run), "paths": paths}]}))


def test_csv_is_tidy_and_complete(tmp_path: Path) -> None:
    a, b = current_run(tmp_path, "a", size=64, beams=5), current_run(tmp_path, "b")
    _analysis(a, {"vision": 99.5, "qformer": 87.25, "text": 91.0})
    text = render_report([a, b], "csv")
    lines = list(csv.DictReader(io.StringIO(text)))
    # every run x point x metric (7 recorded + SPICE's reason), and a's three effective ranks on its last point
    assert len(lines) == 2 * 3 * 8 + 3 + 1  # + b's "not analysed" reason
    for run in (a, b):
        for e in json.loads((run / "results.json").read_text())["evaluations"]:
            got = {x["metric"]: x for x in lines if x["run"] == run.name and x["point"] == e["point"]}
            for name, value in e["metrics"].items():
                assert float(got[name]["value"]) == value  # repr round trip: exact
            assert got["SPICE"]["value"] == "" and got["SPICE"]["unavailable"] == SPICE_MISSING["SPICE"]
            assert int(got["Bleu_4"]["global_step"]) == e["global_step"]
            assert float(got["Bleu_4"]["trainable_share"]) == e["trainable"] / e["total"]
    ranks = {x["metric"]: float(x["value"]) for x in lines if x["metric"].startswith("eff_rank_pct:")}
    assert ranks == {"eff_rank_pct:vision": 99.5, "eff_rank_pct:qformer": 87.25, "eff_rank_pct:text": 91.0}
    assert {x["differs"] for x in lines if x["run"] == "a"} == {""}  # a tie: the first run is the reference
    assert {x["differs"] for x in lines if x["run"] == "b"} == {"size;beams"}
    assert {(x["size"], x["num_beams"], x["settings_source"]) for x in lines if x["run"] == "a"} == {
        ("64", "5", "results.json")}


def test_flags_against_the_first_run_on_a_tie(tmp_path: Path) -> None:
    a, b = current_run(tmp_path, "a", size=64, beams=5), current_run(tmp_path, "b")
    table = _table(render_report([a, b]))
    assert {r["Differs"] for r in table if r["Run"] == "a"} == {""}
    assert {r["Differs"] for r in table if r["Run"] == "b"} == {"≠ size, beams"}


def test_latex_is_a_tabular_with_escaped_text(tmp_path: Path) -> None:
    a = current_run(tmp_path, "run_a", size=64, beams=5)
    b = current_run(tmp_path, "run_b")
    _analysis(a, {"vision": 99.5, "qformer": 87.25, "text": 91.0})
    tex = render_report([a, b], "latex")
    begin = tex.index("\\begin{tabular}{")
    body = tex[begin: tex.index("\\end{tabular}")]
    spec = re.match(r"\\begin\{tabular\}\{([lr]+)\}", body)[1]
    rows = [line for line in body.splitlines() if line.endswith("\\\\")]
    assert len(rows) == 1 + 6  # header + 2 runs x 3 points
    for line in rows:
        assert len(re.split(r"(?<!\\)&", line)) == len(spec)  # every row fills every column
    assert "run\\_a" in tex and "run\\_b" in tex and "Eff. rank (\\% of ref.)" in tex
    assert re.search(r"(?<!\\)[_%#&]", "\n".join(rows).replace(" & ", " ")) is None  # nothing unescaped
    assert "$\\neq$ size, beams" in tex and "prefix $\\rightarrow$ prefix+lora" in tex
    assert "v 99.5 / q 87.2 / t 91.0" in tex


# --- Through the CLI, as a user runs it ----------------------------------------------------------------------

def test_cli_formats_follow_the_out_suffix(tmp_path: Path, capsys) -> None:
    a, b = current_run(tmp_path, "a", size=64, beams=5), current_run(tmp_path, "b")
    for suffix, check in ((".csv", lambda t: list(csv.DictReader(io.StringIO(t)))[0]["run"] == "a"),
                          (".tex", lambda t: t.startswith("\\begin{tabular}")),
                          (".md", lambda t: _table(t)[0]["Run"] == "a")):
        out = tmp_path / f"report{suffix}"
        assert main(["report", str(a), str(b), "--out", str(out)]) == 0
        assert capsys.readouterr().out == out.read_text() and check(out.read_text())
    assert main(["report", str(a), str(b), "--format", "csv", "--out", str(tmp_path / "r.txt")]) == 0
    assert (tmp_path / "r.txt").read_text().startswith("run,run_dir,plan,seed,")
    capsys.readouterr()
    assert main(["report", str(a), str(b)]) == 0  # stdout, markdown
    assert "≠ size, beams" in capsys.readouterr().out


@pytest.mark.parametrize("problem", ["suffix", "not a run", "bad results"])
def test_cli_user_errors_are_one_line_and_write_nothing(tmp_path: Path, capsys, problem: str) -> None:
    run = current_run(tmp_path, "a")
    out = tmp_path / ("report.txt" if problem == "suffix" else "report.md")
    if problem == "not a run":
        run = tmp_path / "empty"
        run.mkdir()
    if problem == "bad results":
        (run / "results.json").write_text('{"evaluations": [')
    assert main(["report", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("ptscale report: ")
    assert {"suffix": "--format", "not a run": "no recipe.yaml", "bad results": "results.json"}[problem] in err
    assert not out.exists()


# --- Placement labels and aggregation over seeds -------------------------------------------------------------

QFORMER_ONLY = "lora.targets={qformer: [attention.attention.query, attention.attention.key, attention.attention.value]}"


def test_two_lora_placements_get_two_labels(tmp_path: Path) -> None:
    both = current_run(tmp_path, "both", plan="lora")
    qformer = current_run(tmp_path, "qformer", plan="lora", overrides=(QFORMER_ONLY,))
    rows = {r["Run"]: r for r in _rows(render_report([both, qformer]))}
    assert rows["both"]["Plan"] == rows["qformer"]["Plan"] == "lora"
    assert rows["qformer"]["Placement"] == "LoRA r16 Q-Former query/key/value"
    assert rows["both"]["Placement"] == "LoRA r16 Q-Former query/key/value; LoRA r16 LM q_proj/k_proj/v_proj"


def test_aggregate_gives_mean_and_std_over_seeds_and_one_pretrained_row(tmp_path: Path, capsys) -> None:
    runs = [current_run(tmp_path, f"s{seed}", seed=seed, plan="lora") for seed in (0, 1, 2)]
    runs.append(current_run(tmp_path, "q", seed=0, plan="lora", overrides=(QFORMER_ONLY,)))
    # seed 2 scores CIDEr 1.0 instead of 2.068 at its last point: mean and sample std of 206.8, 206.8, 100
    final = json.loads((runs[2] / "results.json").read_text())
    final["evaluations"][-1]["metrics"]["CIDEr"] = 1.0
    (runs[2] / "results.json").write_text(json.dumps(final))
    assert main(["report", *map(str, runs), "--aggregate"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[1:]]
    assert rows[0]["Method (plan and placement)"] == "pre-trained" and rows[0]["Seeds"] == "0,1,2"
    assert rows[0]["C"] == "20.7 ± 0.0"  # every run's evaluation before training, one row
    both = [r for r in rows if r["Point"] == "prefix+lora" and "LM q_proj" in r["Method (plan and placement)"]]
    assert len(both) == 1 and both[0]["Seeds"] == "0,1,2"
    assert both[0]["C"] == "171.2 ± 61.7"
    assert len([r for r in rows if r["Method (plan and placement)"] == "lora (LoRA r16 Q-Former query/key/value)"]) == 2
    assert "Mean ± sample std" in out
