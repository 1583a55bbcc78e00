"""``ptscale eval`` on saved tiny runs: one process reproduces the run's own evaluation; two ZeRO-3 ranks give
the same captions as one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ptscale.cli import main
from ptscale.config import EvalConfig, RunConfig, load_recipe
from ptscale.eval.evaluate import load_eval_data
from ptscale.eval.run_eval import EVAL_RESULTS, EVAL_ROWS, EvalRequest, generation_settings
from ptscale.training.engine import free_port
from tests.runs_fixture import ROOT, tiny_runs  # noqa: F401

BIN = Path(sys.executable).parent



def _final(run: Path) -> tuple[dict, dict[str, str]]:
    """The run's last evaluation in results.json and the captions it wrote then."""
    evaluation = json.loads((run / "results.json").read_text())["evaluations"][-1]
    rows = json.loads((run / f"captions-{evaluation['point']}.json").read_text())
    return evaluation, {r["image_id"]: r["caption"] for r in rows}


def _written(out: Path) -> tuple[dict, list[dict]]:
    return json.loads((out / EVAL_RESULTS).read_text()), json.loads((out / EVAL_ROWS["caption"]).read_text())


def test_one_process_reproduces_the_runs_final_evaluation(tiny_runs, tmp_path, capsys):  # noqa: F811
    run = tiny_runs.a
    assert main(["eval", str(run), "--out", str(tmp_path)]) == 0
    assert f"eval directory: {tmp_path}" in capsys.readouterr().out
    evaluation, run_captions = _final(run)
    results, rows = _written(tmp_path)

    assert {r["image_id"]: r["caption"] for r in rows} == run_captions  # the same text, image by image
    assert results["metrics"]["CIDEr"] == pytest.approx(evaluation["metrics"]["CIDEr"], abs=1e-12)
    assert results["metrics"]["Bleu_4"] == pytest.approx(evaluation["metrics"]["Bleu_4"], abs=1e-12)
    assert results["unavailable"] == evaluation["unavailable"]
    assert "SPICE" in results["metrics"] or results["unavailable"]["SPICE"]  # a reason, never a silent 0
    # The newest checkpoint, the run's own generation settings, and the split that was captioned.
    newest = sorted((run / "checkpoints").glob("ckpt-*"))[-1]
    assert Path(results["checkpoint"]) == newest
    recipe = load_recipe(run / "recipe.yaml").eval
    assert results["generation"] == {"num_beams": 1, "max_new_tokens": recipe.max_new_tokens,
                                     "min_new_tokens": recipe.min_new_tokens, "batch_size": recipe.batch_size}
    # data.eval_size=16 per evaluation group (test, gen/, ret/): 48 images
    assert results["data"]["source"] == "synthetic" and results["data"]["size"] == 48
    assert results["world_size"] == 1 and results["n_images"] == 16  # the test group's: the plain metric names
    # Per-image rows in split order, each with its references and headline scores.
    assert [r["image_id"] for r in rows] == _suite_ids(16)
    for r in rows:
        assert r["references"] and set(r) >= {"Bleu_4", "CIDEr", "scores"}
        assert r["CIDEr"] == r["scores"]["CIDEr"] >= 0.0
    test_group = [r for r in rows if not r["image_id"].startswith(("eval-gen-", "eval-ret-"))]
    mean_cider = sum(r["CIDEr"] for r in test_group) / len(test_group)
    assert mean_cider == pytest.approx(results["metrics"]["CIDEr"], rel=1e-9)  # corpus CIDEr is the mean


def _suite_ids(per_group: int) -> list[str]:
    """The evaluation suite's images in split order: the test group, then gen/ and ret/."""
    return [f"eval-{g}{i}" for g in ("", "gen-", "ret-") for i in range(per_group)]


@pytest.mark.slow
def test_two_zero3_ranks_give_the_captions_of_one(tiny_runs, tmp_path):  # noqa: F811
    """Run b has 15 eval images per group, 45 in all: 2 ranks pad their shards to 23 + 23, and the duplicate must
    vanish."""
    run = tiny_runs.b
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [str(BIN / "deepspeed"), "--master_port", free_port(), "--num_gpus", "2", "launchers/eval.py",
           str(run), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    evaluation, run_captions = _final(run)
    results, rows = _written(tmp_path)
    assert results["world_size"] == 2
    assert [r["image_id"] for r in rows] == _suite_ids(15)  # no duplicate, none missing
    assert {r["image_id"]: r["caption"] for r in rows} == run_captions
    assert results["metrics"]["CIDEr"] == pytest.approx(evaluation["metrics"]["CIDEr"], abs=1e-12)


def test_generation_overrides_only_what_is_given():
    run_eval = EvalConfig(num_beams=5, max_new_tokens=16, min_new_tokens=1, batch_size=32)
    request = EvalRequest(run_dir=Path("r"), num_beams=2, min_new_tokens=0)
    settings = generation_settings(run_eval, request)
    assert (settings.num_beams, settings.max_new_tokens, settings.min_new_tokens, settings.batch_size) == (2, 16, 0, 32)
    with pytest.raises(ValueError, match="--num-beams must be >= 1"):
        generation_settings(run_eval, EvalRequest(run_dir=Path("r"), num_beams=0))
    with pytest.raises(ValueError, match="exceeds --max-new-tokens 4"):
        generation_settings(run_eval, EvalRequest(run_dir=Path("r"), min_new_tokens=5, max_new_tokens=4))


def test_eval_data_is_the_runs_split():
    """The synthetic eval split as training built it; the size override serves ``analyze --samples``."""
    from ptscale.data.synthetic import EVAL_GROUPS, make_eval_suite

    class NoPixels:  # load_splits preprocesses synthetic records; pixels are not what is checked here
        tokenizer = None  # nor the vocabulary check (tests/data/test_vocabulary.py): no tokenizer, nothing measured

        def preprocess(self, records):
            return records

    cfg = RunConfig()
    data = load_eval_data(cfg, NoPixels())
    # the suite: test, generalisation and retention groups of data.eval_size each
    expected = make_eval_suite(cfg.data.task, cfg.data.eval_size, cfg.data.seed)
    assert [r["image_id"] for r in data.records] == [r["image_id"] for r in expected]
    assert data.references == {r["image_id"]: r["captions"] for r in expected}
    groups = len(EVAL_GROUPS)
    assert data.task == "caption" and data.description["size"] == groups * cfg.data.eval_size
    assert len(load_eval_data(cfg, NoPixels(), size=5).records) == groups * 5
    with pytest.raises(ValueError, match="choose eval or train"):
        load_eval_data(cfg, NoPixels(), split="test")


def test_a_directory_that_is_not_a_run_is_refused(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2  # one line, no traceback
    assert "no recipe.yaml" in capsys.readouterr().err


def test_the_old_checkpoint_spelling_still_names_the_run_and_says_it_is_deprecated(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path)]) == 2  # the same run directory check as RUN_DIR
    err = capsys.readouterr().err
    assert "--checkpoint RUN_DIR is deprecated" in err and f"ptscale eval {tmp_path}" in err
    assert "no recipe.yaml" in err


def test_the_run_directory_is_given_once(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--checkpoint", str(tmp_path)]) == 2
    assert main(["eval"]) == 2
    err = capsys.readouterr().err
    assert "give the run directory once" in err and "name the run directory" in err


def test_spice_off_is_a_choice_the_evaluation_accepts(tiny_runs, tmp_path, capsys):  # noqa: F811
    """Every listed --spice choice reaches the scorer: 'off' used to crash after generation."""
    assert main(["eval", str(tiny_runs.b), "--spice", "off", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    results, _ = _written(tmp_path)
    assert "SPICE" not in results["metrics"] and "disabled" in results["unavailable"]["SPICE"]
    assert "SPICE: n/a" in out and f"eval directory: {tmp_path}" in out
