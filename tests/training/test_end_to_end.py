"""Real launches: the embedded default on 2 ranks under ZeRO-3 (deepspeed launcher), and torchrun.

The default backbone comes from the user cache (built by the first run on a machine, then reused)."""

import json
import subprocess
import sys

import pytest

from ptscale.models.groups import group_of
from tests.launch import BIN, ROOT, changed_groups, last_program_line, launch


@pytest.mark.slow
def test_default_run_two_ranks_zero3(tmp_path):
    out = launch([str(BIN / "deepspeed"), "--num_gpus", "2", "launchers/train.py", "--ds", "ds_configs/zero3.json",
                   f"output_dir={tmp_path}", "run_name=default"], timeout=1500)
    run = tmp_path / "default"
    assert last_program_line(out) == f"run directory: {run}"
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2
    points = {e["point"]: e for e in results["evaluations"]}
    assert list(points) == ["before training", "prefix", "prefix+lora"]
    for e in points.values():
        assert set(e["metrics"]) >= {"Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    assert points["prefix+lora"]["metrics"]["CIDEr"] > points["before training"]["metrics"]["CIDEr"]
    assert points["prefix"]["trainable"] < points["prefix+lora"]["trainable"]
    # Exactly the planned groups moved in each stage (every parameter gathered and hashed under ZeRO-3).
    assert changed_groups(run / "stage-1-prefix") == {"prefix"}
    assert changed_groups(run / "stage-2-prefix+lora") == {"prefix", "lora"}
    assert "| evaluated" in out and "CIDEr" in out
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["kind"] == "train"]
    assert {"loss", "lr", "samples_per_s", "stage"} <= set(train[0])
    assert {x["stage"] for x in train} == {"prefix", "prefix+lora"}
    assert [x["stage"] for x in lines if x["kind"] == "eval"] == list(points)
    # The vision tower is frozen and tuner-free in both stages: its features come from the cache after epoch 1.
    cache = {x["stage"]: x for x in lines if x["kind"] == "feature_cache"}
    # Each image's features are computed at most once per rank (data.train_size: 512 training images), then reused.
    assert set(cache) == {"prefix", "prefix+lora"}
    assert cache["prefix"]["hits"] > 0 and 0 < cache["prefix"]["misses"] <= 512
    assert list((run / "tensorboard").iterdir())
    from safetensors.torch import load_file

    weights = load_file(run / "stage-2-prefix+lora" / "trainable.safetensors")
    assert weights and all(v.numel() > 0 for v in weights.values())  # gathered, never (0,) shards
    assert {group_of(n) for n in weights} == {"prefix", "lora"}


@pytest.mark.slow
def test_torchrun_two_ranks_short_plan(tmp_path):
    out = launch([str(BIN / "torchrun"), "--nproc_per_node", "2", "launchers/train.py",
                   "--ds", "ds_configs/zero3.json", f"output_dir={tmp_path}", "run_name=tr",
                   "eval.before_training=false", "eval.num_beams=1", "methods.prefix.steps=3", "methods.lora.steps=3",
                   "methods.prefix.evaluate=false"], timeout=900)
    run = tmp_path / "tr"
    assert last_program_line(out) == f"run directory: {run}"
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2 and [e["point"] for e in results["evaluations"]] == ["prefix+lora"]
    assert changed_groups(run / "stage-1-prefix") == {"prefix"}


def test_bad_recipe_fails_before_any_model_is_built(tmp_path):
    cmd = [sys.executable, "launchers/train.py", "plan=null", "stages=[{train: [prefix, wings]}]"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "stages.0.train: unknown parameter group 'wings'" in proc.stderr
    assert "Traceback" not in proc.stderr
