"""Activation checkpointing under ZeRO-3 across a stage switch: the second stage's engine must own its backward
hooks (DeepSpeed reuses a module's first pre/post-backward Functions, bound to the first engine, unless
engine.release drops them; the recompute then frees frozen weights and torch raises CheckpointError).
The same run with checkpointing (with and without CPU offload) and without ends at the same weights."""

import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ptscale.tools.kill_resume import max_diff

ROOT = Path(__file__).resolve().parents[2]


def _run(out: Path, name: str, checkpointing: bool, ds_config: str) -> dict:
    proc = subprocess.run([sys.executable, "launchers/train.py", "--ds", ds_config, f"output_dir={out}",
                           f"run_name={name}", f"model.gradient_checkpointing={str(checkpointing).lower()}",
                           "methods={prefix: {steps: 2, lr: 1.0e-3, evaluate: false}, "
                           "lora: {steps: 2, lr: 1.0e-3, evaluate: false}}",
                           "eval.before_training=false", "data.train_size=32", "checkpoint.every_steps=0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(out / name / "stage-2-prefix+lora" / "trainable.safetensors")


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> dict:
    return _run(tmp_path_factory.mktemp("plain"), "plain", False, "ds_configs/zero3.json")


@pytest.mark.slow
@pytest.mark.parametrize("ds_config", ["ds_configs/zero3.json", "ds_configs/zero3_offload.json"])
def test_checkpointed_two_stage_run_matches_the_plain_one(tmp_path, plain, ds_config):
    """Checkpointing on, with ZeRO-3 alone and with parameters and optimizer offloaded to the host."""
    assert max_diff(_run(tmp_path, "checkpointed", True, ds_config), plain) <= 1e-5
