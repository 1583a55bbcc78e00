"""The recipe with ``model.path`` under ZeRO-3 on 2 ranks: the backbone is built partitioned (zero.Init, via
HfDeepSpeedConfig + from_pretrained), evaluated before training through the first engine, trained
prefix -> prefix+full, and a mid-stage-2 checkpoint (full backbone weights) loads back into the partitioned
parameters and finishes with the uninterrupted run's weights."""

import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from ptscale.checkpoint import list_checkpoints
from ptscale.models.pretrain import new_tiny_model, tiny_processor
from ptscale.runs import load_run
from ptscale.tools.kill_resume import max_diff
from tests.launch import BIN, ROOT, changed_groups, launch

FULL = {"prefix", "vision", "qformer", "projection", "language_model"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf-checkpoint")
    model, tok = new_tiny_model("tiny-blip2-opt", seed=0)
    for thing in (model, tok, tiny_processor()):
        thing.save_pretrained(path)
    return path


def _train(out, name, saved, *extra):
    return launch([str(BIN / "deepspeed"), "--num_gpus", "2", "launchers/train.py", "--ds", "ds_configs/zero3.json",
                    f"output_dir={out}", f"run_name={name}", f"model.path={saved}", "plan=prefix->full",
                    "methods={prefix: {steps: 2, lr: 5.0e-3, evaluate: false}, full: {steps: 3, lr: 1.0e-4}}",
                    "eval.num_beams=1", "data.train_size=64", "data.eval_size=8", "checkpoint.every_steps=1",
                    "checkpoint.keep_last=20", *extra], timeout=900)


@pytest.mark.slow
def test_model_path_builds_partitioned_and_resumes_full_weights_into_the_shards(tmp_path, saved):
    out = _train(tmp_path, "a", saved)
    assert out.count(f"built {saved} under zero.Init") == 2  # one memory line per rank
    run = tmp_path / "a"
    stages = sorted(run.glob("stage-*"), key=lambda d: int(d.name.split("-")[1]))
    assert [changed_groups(d) for d in stages] == [{"prefix"}, FULL]
    assert "[eval: before training]" in out and "[eval: prefix+full]" in out, out[-3000:]
    reference = load_file(stages[1] / "trainable.safetensors")

    # resume from stage 2, step 1: its checkpoint holds every backbone weight, copied into the partitions
    ckpt = next(c for c in list_checkpoints(run / "checkpoints") if c.name.startswith("ckpt-01-") and
                c.name != "ckpt-01-000000")
    shutil.copytree(run, tmp_path / "b", ignore=shutil.ignore_patterns("stage-2-*"))
    out = _train(tmp_path, "b", saved, "--resume", str(tmp_path / "b" / "checkpoints" / ckpt.name))
    assert "resuming from" in out
    resumed = load_file(tmp_path / "b" / stages[1].name / "trainable.safetensors")
    assert max_diff(resumed, reference) <= 1e-6


# bf16 under zero.Init: the fp32 prefixes added after the build must be cast (cast_added_parameters)
@pytest.mark.slow
@pytest.mark.parametrize("ds_config, dtype, built_sharded", [("zero3.json", "bf16", True),
                                                             ("zero2.json", "fp32", False)])
def test_random_weights_preset_trains_built_sharded_only_under_zero3(tmp_path, ds_config, dtype, built_sharded):
    """``pretrain_steps=0``: the preset's geometry with random weights (how the OPT-2.7B geometry runs here)."""
    proc = subprocess.run([sys.executable, "launchers/train.py", "--ds", f"ds_configs/{ds_config}",
                           f"model.dtype={dtype}", f"output_dir={tmp_path}", "run_name=r", "model.pretrain_steps=0",
                           "plan=prefix",
                           "methods.prefix={steps: 1, lr: 1.0e-3, evaluate: false}", "eval.before_training=false",
                           "data.train_size=32"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RANDOM weights" in proc.stderr
    assert ("built tiny-blip2-opt under zero.Init" in proc.stdout) == built_sharded
    assert (tmp_path / "r" / "stage-1-prefix" / "trainable.safetensors").is_file()
    with pytest.raises(ValueError, match="random weights .* never saved"):  # eval / export cannot rebuild them
        load_run(tmp_path / "r")
