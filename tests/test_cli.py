"""The command line as a user meets it: every mistake is one line naming the problem and the fix, exit 2
(recipe, option, directory) or 3 (unreadable data or files), no traceback, and no run directory left
behind; `ptscale config` / `--print-config` / `--dry-run` show and check a recipe without training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ptscale.config import load_recipe
from tests.launch import ROOT, TRAIN, assert_one_line, cli, user_env

# --- mistakes found before torch is imported ----------------------------------------------------------------

@pytest.mark.parametrize("make, code, needles", [
    (lambda d: ["--recipe", str(_write(d / "r.yaml", "model:\n  preset: [tiny\n"))], 2, ["r.yaml", "line", "YAML"]),
    (lambda d: ["model.colour=red"], 2, ["model.colour"]),
    (lambda d: ["--ds", str(_write(d / "z.json", json.dumps({"zero_optimization": {"stage": 7}})))], 2,
     ["zero_optimization.stage", "7"]),
    (lambda d: ["--ds", str(_write(d / "b.json", json.dumps({"train_batch_size": 999})))], 2,
     ["train_batch_size", "999", "auto"]),
    (lambda d: ["--ds", str(d / "missing.json")], 2, ["missing.json"]),
    (lambda d: ["--resume", str(d / "nope")], 2, ["--resume", "no such directory"]),
    (lambda d: ["plan=lora", "prefix.lengths.qformer=4"], 2, ["prefix.lengths.qformer", "plan lora"]),
    (lambda d: ["plan=prefix", "methods.lora.lr=1e-4"], 2, ["methods.lora.lr", "plan prefix"]),
    (lambda d: ["methods.lora.train=[vision]"], 2, ["methods.lora.train"]),
    (lambda d: ["--recipe", str(_write(d / "s.yaml", "stages: [{train: [prefix], steps: 2}]\n")),
                "methods.lora.lr=1e-4"], 2, ["methods.lora.lr", "stages"]),
    (lambda d: ["plan=lora", "adapter={kind: sequential, components: [qformer], bottleneck: 4}"], 2,
     ["adapter", "plan lora"]),
    (lambda d: ["plan=prefix->lora->full"], 2, ["plan", "more than two"]),
    (lambda d: ["model.preset=nope"], 2, ["model.preset", "nope", "tiny-blip2-opt"]),
    (lambda d: ["run_name=.."], 2, ["run_name", "plain directory name"]),
    (lambda d: ["methods.prefix.lr=nan"], 2, ["stages.0.lr", "finite", "nan"]),
    (lambda d: ["log_every=0"], 2, ["log_every", ">= 1"]),
    (lambda d: [f"output_dir={_write(d / 'afile', 'x')}/runs"], 2, ["output_dir", "is a file"]),
    (lambda d: ["--recipe", str(d)], 2, ["is a directory"]),
    (lambda d: ["--recipe", str(_write_bytes(d / "g.yaml", bytes(range(128, 256))))], 2, ["not UTF-8"]),
    (lambda d: ["--ds", str(_write(d / "a.json", json.dumps({"steps_per_print": "auto"})))], 2,
     ["steps_per_print", "auto"]),
    (lambda d: ["data.task=nope"], 2, ["data.task", "nope", "downstream"]),
])
def test_recipe_mistakes_are_one_line_before_anything_runs(tmp_path, make, code, needles):
    out = tmp_path / "out"
    proc = cli(TRAIN, f"output_dir={out}", *make(tmp_path))
    assert_one_line(proc, code, *needles)
    assert not out.exists()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# --- mistakes found while checking the backbone, the data and the model (before a run directory exists) ------

TORN_JSON = '{"images": [{"filename": "a.jpg"'


def _truncated(d: Path, blip2_dir: Path) -> str:
    import shutil

    copy = d / "truncated"
    shutil.copytree(blip2_dir, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return f"model.path={copy}"


def _opt_dir(d: Path) -> str:
    from transformers import OPTConfig

    OPTConfig(hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2).save_pretrained(d / "opt")
    return f"model.path={d / 'opt'}"


@pytest.mark.slow  # each case starts DeepSpeed and reads the backbone (about 8 s)
@pytest.mark.parametrize("make, code, needles", [
    (lambda d, b: [f"model.path={d / 'nowhere'}"], 2, ["model.path", "no such directory"]),
    (lambda d, b: [f"model.path={(d / 'empty').mkdir() or d / 'empty'}"], 2, ["model.path", "config.json"]),
    # a language model is trained on text data: image data with it is one line naming the fix
    (lambda d, b: [_opt_dir(d)], 2, ["data.name: synthetic is image data", "model.family opt", "data.name: text"]),
    (lambda d, b: [_truncated(d, b)], 3, ["model.safetensors", "truncated"]),
    (lambda d, b: [f"model.path={b}", "prefix.lengths.encoder=4"], 2, ["prefix.lengths"]),
    (lambda d, b: [f"model.path={b}", "lora.targets={qformer: [nope]}"], 2, ["lora.targets.qformer", "nope"]),
    (lambda d, b: [f"model.path={b}", "data.train_size=16", "methods.prefix.batch_size=32"], 2,
     ["stages.0.batch_size", "32", "data.train_size"]),
    (lambda d, b: [f"model.path={b}", "data.name=coco", f"data.image_root={d}",
                   "data.karpathy_json=" + str(_write(d / "karpathy.json", TORN_JSON))], 3,
     ["karpathy.json", "not valid JSON"]),
])
def test_backbone_and_model_mistakes_leave_no_run_directory(tmp_path, blip2_dir, make, code, needles):
    out = tmp_path / "out"
    proc = cli(TRAIN, f"output_dir={out}", "data.train_size=16", "data.eval_size=4", *make(tmp_path, blip2_dir))
    assert_one_line(proc, code, *needles)
    assert not out.exists()


@pytest.mark.slow  # a CLI process that loads torch before it reads the run directory
def test_eval_of_a_missing_run_is_one_line(tmp_path):
    proc = cli("-m", "ptscale.cli", "eval", str(tmp_path / "nope"))
    assert_one_line(proc, 2, "nope", "no such directory")


# --- showing and checking a recipe ---------------------------------------------------------------------------

def test_print_config_is_the_resolved_recipe_and_reloads_to_it(tmp_path):
    proc = cli(TRAIN, "--print-config", "plan=prefix->full", "methods.full.lr=2e-5")
    assert proc.returncode == 0, proc.stderr
    saved = _write(tmp_path / "resolved.yaml", proc.stdout)
    cfg = load_recipe(saved)
    assert cfg == load_recipe(overrides=["plan=prefix->full", "methods.full.lr=2e-5"])
    assert cfg.stages[1].lr == 2e-5 and cfg.model.pretrain_steps == 2400  # every key is there, at its value
    same = cli("-m", "ptscale.cli", "config", "plan=prefix->full", "methods.full.lr=2e-5")
    assert same.returncode == 0 and same.stdout == proc.stdout


def test_a_users_recipe_gets_the_same_defaults_as_the_embedded_one(tmp_path):
    mine = load_recipe(_write(tmp_path / "mine.yaml", "plan: prefix->lora\n"))
    assert mine == load_recipe()  # one source of defaults: the embedded recipe only names its plan
    assert yaml.safe_load((ROOT / "ptscale" / "recipes" / "default.yaml").read_text()) == {"plan": "prefix->lora"}


@pytest.mark.slow
def test_dry_run_checks_everything_and_writes_nothing(tmp_path, blip2_dir):
    out = tmp_path / "out"
    proc = cli(TRAIN, "--dry-run", f"output_dir={out}", f"model.path={blip2_dir}", "data.train_size=16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dry run OK" in proc.stdout and "plan prefix->lora" in proc.stdout
    assert not out.exists()


@pytest.mark.slow  # starts DeepSpeed (about 8 s each)
@pytest.mark.parametrize("setting, needles", [
    ("flash", ["PTSCALE_ATTENTION='flash'", "auto, reference, triton"]),
    ("triton", ["PTSCALE_ATTENTION=triton", "tensors on cpu", "PTSCALE_ATTENTION=reference"]),  # no GPU here
])
def test_an_attention_backend_that_cannot_run_is_refused_before_the_run_starts(tmp_path, blip2_dir, setting, needles):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, TRAIN, f"output_dir={out}", f"model.path={blip2_dir}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=user_env() | {"PTSCALE_ATTENTION": setting})
    assert_one_line(proc, 2, *needles)
    assert not out.exists()
