"""``ptscale grid``: equal budgets, resumability (finished runs skipped, unfinished ones restarted) and the
tables, CSV and figure it writes, on fake run directories (a real tiny grid: tests/test_grid_cli.py)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from ptscale import grid
from ptscale.config import dump_recipe, load_recipe
from ptscale.errors import RecipeError
from ptscale.grid import Arm, GridSpec, budget_overrides, jobs, parse_arm, run_jobs, write_tables

PATHS = ("vision", "qformer", "text")


def _spec(tmp_path: Path, **kw) -> GridSpec:
    return GridSpec(tmp_path / "g", [Arm("lora"), Arm("prefix->lora")], [0, 1, 2], ["downstream"], ceiling=False, **kw)


def _overrides(job: grid.Job) -> list[str]:
    return job.command[job.command.index("--quiet") + 1:]


def _metrics(arm: str, seed: int) -> dict[str, float]:
    base = 0.5 if arm == "lora" else 0.6  # prefix->lora is 10 points better on every metric ...
    base += 0.01 * seed
    if arm != "lora" and seed == 2:
        base -= 0.2  # ... except on seed 2
    out = {}
    for group in ("", "gen/", "ret/"):
        out |= {f"{group}Bleu_4": base, f"{group}CIDEr": 2 * base, f"{group}AttrAcc": base}
    return out


def _curve(decay: float, n: int = 10) -> list[float]:
    values = [decay ** i for i in range(n)]
    total = sum(values)
    out, acc = [], 0.0
    for v in values:
        acc += v / total
        out.append(acc)
    return out


def _finish(job: grid.Job, *, complete: bool = True) -> None:
    """What a run leaves behind: its resolved recipe and results.json (the final stage's evaluation or not)."""
    cfg = load_recipe(None, _overrides(job))
    job.run_dir.mkdir(parents=True)
    (job.run_dir / "recipe.yaml").write_text(dump_recipe(cfg))
    last = len(cfg.stages) - 1
    evaluations = []
    if "eval.before_training=true" in _overrides(job):
        evaluations.append({"point": "before training", "stage_index": -1, "metrics": _metrics("pre", 0)})
    if complete:
        evaluations.append({"point": cfg.stages[-1].name, "stage_index": last,
                            "metrics": _metrics(job.arm.name, job.seed)})
    (job.run_dir / "results.json").write_text(json.dumps({"evaluations": evaluations}))


def _analysis(all_jobs: list[grid.Job]) -> dict:
    def entry(run_dir, decay):
        return {"role": "run" if run_dir else "reference", "run_dir": str(run_dir) if run_dir else None,
                "paths": {p: {"effective_rank": 5, "length": 10, "percent_of_reference": 100 * (0.5 if decay < 0.6
                                                                                                else 1.0),
                              "cumulative": _curve(decay)} for p in PATHS}}
    models = [entry(None, 0.8)] + [entry(j.run_dir, 0.5 if j.arm.name == "lora" else 0.8) for j in all_jobs]
    return {"threshold": 0.9, "data": {"size": 30}, "models": models}


def test_budgets_add_up_to_the_same_passes_for_every_plan() -> None:
    assert budget_overrides("prefix", 5, 0.6) == ["methods.prefix.epochs=5"]
    assert budget_overrides("prefix->lora", 5, 0.6) == ["methods.prefix.epochs=3", "methods.lora.epochs=2"]
    assert budget_overrides("prefix+lora", 5, 0.6) == ["methods.lora.epochs=5"]  # one joint stage
    assert budget_overrides("lora->prefix", 5, 0.6) == ["methods.lora.epochs=2.5"]  # two stages, one method
    for plan in grid.PAPER_ARMS:
        cfg = load_recipe(None, [f"plan={plan}", *budget_overrides(plan, 5, 0.6),
                                 *(grid.ADAPTER_DEFAULT if "adapter" in plan else ())])
        assert sum(s.epochs for s in cfg.stages) == pytest.approx(5.0)


def test_an_arm_is_a_plan_with_overrides() -> None:
    arm = parse_arm("prefix->lora methods.lora.lr=1e-4 'lora.targets={language_model: [q_proj]}'")
    assert arm.plan == "prefix->lora" and arm.overrides[1] == "lora.targets={language_model: [q_proj]}"
    with pytest.raises(RecipeError, match="unknown method"):
        parse_arm("prefix->lorra")
    with pytest.raises(RecipeError, match="not key=value"):
        parse_arm("lora lr")


def test_finished_runs_are_skipped_and_unfinished_ones_restarted(tmp_path, monkeypatch) -> None:
    spec = _spec(tmp_path)
    all_jobs = jobs(spec)
    assert len(all_jobs) == 6 and len({j.run_dir for j in all_jobs}) == 6
    for job in all_jobs[:4]:
        _finish(job)
    _finish(all_jobs[4], complete=False)  # killed after training began: no final evaluation
    (all_jobs[4].run_dir / "stale").write_text("x")
    calls = []

    def fake_call(command, **kw):
        job = next(j for j in all_jobs if j.command == command)
        assert not job.run_dir.exists()  # the unfinished directory was cleared first
        calls.append(job.run_dir)
        _finish(job)
        return 0

    monkeypatch.setattr(grid.subprocess, "call", fake_call)
    timing = run_jobs(all_jobs, spec.out / "logs")
    assert calls == [all_jobs[4].run_dir, all_jobs[5].run_dir]
    assert len(timing["skipped"]) == 4 and len(timing["ran"]) == 2
    calls.clear()
    assert run_jobs(all_jobs, spec.out / "logs")["skipped"] == [str(j.run_dir) for j in all_jobs] and not calls


def test_a_failing_run_stops_the_grid_naming_its_log(tmp_path, monkeypatch) -> None:
    spec = _spec(tmp_path)
    monkeypatch.setattr(grid.subprocess, "call", lambda command, stdout, **kw: (stdout.write("boom\n"), 3)[1])
    with pytest.raises(RuntimeError, match=r"failed \(exit 3\): boom; full log: .*seed0.log"):
        run_jobs(jobs(spec), spec.out / "logs")


def test_parallel_runs_share_the_cores_after_the_first_runs_alone(tmp_path, monkeypatch) -> None:
    """--jobs 2: the first run alone (it may build the cached backbone the others read), then two at a time,
    each told to use half the cores; every job runs once."""
    import threading
    import time

    spec = _spec(tmp_path)
    all_jobs = jobs(spec)
    lock, running, peaks, threads = threading.Lock(), [0], [], []

    def fake_call(command, env, **kw):
        with lock:
            running[0] += 1
            peaks.append(running[0])
            threads.append(env.get("OMP_NUM_THREADS"))
        time.sleep(0.2)  # long enough for a second run to start beside it when allowed
        _finish(next(j for j in all_jobs if j.command == command))
        with lock:
            running[0] -= 1
        return 0

    monkeypatch.setattr(grid.subprocess, "call", fake_call)
    monkeypatch.setattr(grid.os, "cpu_count", lambda: 4)
    timing = run_jobs(all_jobs, spec.out / "logs", parallel=2)
    assert sorted(r["run_dir"] for r in timing["ran"]) == sorted(str(j.run_dir) for j in all_jobs)
    assert peaks[0] == 1 and max(peaks) == 2 and set(threads) == {"2"}


def test_a_failure_among_parallel_runs_starts_no_new_run(tmp_path, monkeypatch) -> None:
    spec = _spec(tmp_path)
    all_jobs = jobs(spec)
    started = []

    def fake_call(command, stdout, **kw):
        started.append(command)
        if len(started) == 2:
            stdout.write("boom\n")
            return 3
        _finish(next(j for j in all_jobs if j.command == command))
        return 0

    monkeypatch.setattr(grid.subprocess, "call", fake_call)
    with pytest.raises(RuntimeError, match=r"failed \(exit 3\): boom"):
        run_jobs(all_jobs, spec.out / "logs", parallel=2)
    assert len(started) <= 3 < len(all_jobs)  # the run beside the failing one may finish; none starts after


def test_tables_csv_and_figure(tmp_path) -> None:
    spec = _spec(tmp_path)
    all_jobs = jobs(spec)
    for job in all_jobs:
        _finish(job)
    path = write_tables(spec, all_jobs, {"downstream": _analysis(all_jobs)}, {"ran": [], "skipped": [],
                                                                              "seconds": 0.0}, ["ptscale", "grid"])
    text = path.read_text()
    # table 2: mean ± std over three seeds (x100), the pre-trained row first
    assert "| pre-trained | backbone as pre-trained | - | 60.0 |" in text
    assert "| lora | LoRA r16 Q-Former query/key/value; LoRA r16 LM q_proj/k_proj/v_proj | 3 | 51.0 ± 1.0 |" in text
    # paired deltas: +10, +10, -10 points (seed 2) -> mean +3.3, two positive, one negative
    assert "| prefix->lora − lora | 3 | +3.3 ± 11.5 (2+/1-) |" in text
    # table 1: lora collapses to 50 % of the pre-trained rank; the crossing point is read off the curves
    assert "| lora | 50.0 ± 0.0 | 50.0 ± 0.0 | 50.0 ± 0.0 |" in text
    rows = list(csv.DictReader((spec.out / "table2.csv").open()))
    assert {r["arm"] for r in rows} == {"pre-trained", "lora", "prefix->lora"}
    assert len([r for r in rows if r["arm"] == "lora"]) == 3 * 9  # three seeds x every metric
    deltas = list(csv.DictReader((spec.out / "deltas.csv").open()))
    assert {(d["metric"], d["positive"], d["negative"]) for d in deltas} >= {("CIDEr", "2", "1")}
    ranks = list(csv.DictReader((spec.out / "table1.csv").open()))
    lora = [r for r in ranks if r["arm"] == "lora"]
    assert len(lora) == 9 and all(float(r["crossing_percent_of_pretrained"]) < 100 for r in lora)
    assert (spec.out / "figure4_downstream.png").stat().st_size > 0
    commands = (spec.out / "commands.txt").read_text()
    assert "launchers/train.py" in commands
    # the runs' commands as a reader repeats them: no interpreter path of this machine
    assert sys.executable not in commands and "\npython " in commands


def test_tables_only_tabulates_the_finished_runs_and_names_the_missing(tmp_path, monkeypatch) -> None:
    spec = _spec(tmp_path)
    all_jobs = jobs(spec)
    for job in all_jobs[:5]:  # seed-major: seed 2 of prefix->lora is the last job and is not finished
        _finish(job)
    assert [(j.arm.name, j.seed) for j in all_jobs[4:]] == [("lora", 2), ("prefix->lora", 2)]

    def fake_analyse(spec_, task, dirs):
        path = tmp_path / "analysis.json"
        path.write_text(json.dumps(_analysis([j for j in all_jobs if j.run_dir in dirs])))
        return path

    monkeypatch.setattr(grid, "analyse", fake_analyse)
    monkeypatch.setattr(grid.subprocess, "call", lambda *a, **k: pytest.fail("--tables-only must train nothing"))
    text = grid.run_grid(spec, ["ptscale", "grid"], tables_only=True).read_text()
    assert "**Not finished, left out (a partial grid):** downstream/prefix->lora/seed2." in text
    assert "| prefix->lora − lora | 2 |" in text  # two complete pairs
    assert "| lora | LoRA r16 Q-Former query/key/value; LoRA r16 LM q_proj/k_proj/v_proj | 3 |" in text


def test_common_settings_reach_only_the_arms_that_use_them() -> None:
    common = ["methods.prefix.batch_size=4", "methods.lora.lr=1e-4", "lora.r=8", "prefix.lengths.qformer=4",
              "data.train_size=8"]
    assert grid.common_for("lora", common) == ["methods.lora.lr=1e-4", "lora.r=8", "data.train_size=8"]
    assert grid.common_for("prefix->lora", common) == common
    assert grid.common_for("full", common) == ["data.train_size=8"]


def test_every_arm_trains_each_method_at_its_own_tuned_rate_unless_told_otherwise(tmp_path) -> None:
    """The stages of every plan resolve to their method's rate in RATES; --set and an arm's overrides win."""
    rates = {r.split("=")[0].split(".")[1]: float(r.split("=")[1]) for r in grid.RATES}
    spec = GridSpec(tmp_path / "g", [Arm(p) for p in grid.PAPER_ARMS], [0], ["downstream"], ceiling=True)
    for job in jobs(spec):
        cfg = load_recipe(None, _overrides(job))
        for stage, (method, _, _) in zip(cfg.stages, grid.plan_layout(job.arm.plan), strict=True):
            assert stage.lr == rates[method], (job.arm.plan, stage.name)
    spec = GridSpec(tmp_path / "h", [parse_arm("prefix->full methods.full.lr=2e-4")], [0], ["downstream"],
                    common=["methods.prefix.lr=3e-3"], ceiling=False)
    (job,) = jobs(spec)
    assert [s.lr for s in load_recipe(None, _overrides(job)).stages] == [3e-3, 2e-4]


def test_a_pt_arm_with_its_own_overrides_is_paired_with_its_method(tmp_path) -> None:
    """'prefix->lora methods.lora.epochs=3' (LoRA's whole budget after the prefix stage) is a PT-LoRA arm too."""
    spec = GridSpec(tmp_path / "g", [Arm("lora"), parse_arm("prefix->lora methods.lora.epochs=3")], [0, 1, 2],
                    ["downstream"], ceiling=False)
    all_jobs = jobs(spec)
    for job in all_jobs:
        _finish(job)
    text = write_tables(spec, all_jobs, {"downstream": _analysis(all_jobs)}, {"ran": [], "skipped": [],
                                                                              "seconds": 0.0}, ["ptscale"]).read_text()
    assert "| prefix->lora methods.lora.epochs=3 − lora | 3 | +3.3 ± 11.5 (2+/1-) |" in text
