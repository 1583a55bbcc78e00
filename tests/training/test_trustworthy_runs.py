"""A run as a user drives it from the command line (one rank, plain python, a tiny model.path checkpoint):
interrupted and resumed with the command it prints, resumed without repeating its overrides, refused when a
resume would change what it trains or the backbone it trained on, stopped before a non-finite checkpoint,
and logged on one timeline."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ptscale.checkpoint import list_checkpoints
from ptscale.training.engine import free_port
from tests.launch import BIN, ROOT, TRAIN, assert_one_line, cli, user_env

FAST = ["data.train_size=64", "data.eval_size=4", "eval.num_beams=1", "checkpoint.every_steps=2",
        "methods.prefix.batch_size=8", "methods.lora.batch_size=8", "methods.prefix.epochs=2",
        "methods.lora.epochs=1", "log_every=1"]


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_interrupt_prints_the_resume_command_which_finishes_the_run_on_one_timeline(tmp_path, blip2_dir):
    out = tmp_path / "out"
    with open(tmp_path / "stdout", "w") as so, open(tmp_path / "stderr", "w") as se:  # files: a pipe could fill
        proc = subprocess.Popen([sys.executable, TRAIN, f"output_dir={out}", "run_name=r",
                                 f"model.path={blip2_dir}", *FAST], cwd=ROOT, stdout=so, stderr=se, text=True)
        deadline = time.time() + 300
        while not list_checkpoints(out / "r" / "checkpoints") and time.time() < deadline:
            time.sleep(0.5)  # the first checkpoint: training is under way
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=300)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, (tmp_path / "stdout").read_text(),
                                       (tmp_path / "stderr").read_text())
    line = assert_one_line(done, 130, "SIGINT", "newest checkpoint", "resume with:")
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[0] == "python" and command[-2:] == ["--resume", str(out / "r")]
    recipe_before = (out / "r" / "recipe.yaml").read_text()

    resumed = cli(*command[1:])  # exactly what it said, without repeating a single override
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    assert (out / "r" / "recipe.yaml").read_text() == recipe_before  # the saved recipe ruled the resume
    points = [e["point"] for e in json.loads((out / "r" / "results.json").read_text())["evaluations"]]
    assert points == ["before training", "prefix", "prefix+lora"]  # nothing lost across the resume

    records = _records(out / "r")
    train = [r for r in records if r["kind"] == "train"]
    steps = [r["global_step"] for r in train]
    assert steps == sorted(set(steps)) and steps[-1] == len(steps), steps  # one timeline: 1, 2, ... across stages
    stage_two = [r for r in train if r["stage"] == "prefix+lora"]
    assert stage_two[0]["step"] == 1 and stage_two[0]["global_step"] > 1
    evals = {r["stage"]: r["global_step"] for r in records if r["kind"] == "eval"}
    ends = {r["stage"]: r["global_step"] for r in records if r["kind"] == "stage_end"}
    assert evals["before training"] == 0 and evals["prefix"] == ends["prefix"] > 0
    assert evals["prefix+lora"] == ends["prefix+lora"] == steps[-1]


@pytest.mark.slow
def test_resume_refuses_to_change_the_run_and_its_backbone(tmp_path, blip2_dir):
    import shutil

    out, weights = tmp_path / "out", tmp_path / "weights"
    shutil.copytree(blip2_dir, weights)
    done = cli(TRAIN, f"output_dir={out}", "run_name=r", f"model.path={weights}", "plan=prefix", *FAST[:4],
               "methods.prefix.steps=2")
    assert done.returncode == 0, done.stderr[-3000:]
    recipe = (out / "r" / "recipe.yaml").read_text()

    changed = cli(TRAIN, f"output_dir={out}", "run_name=r", "--resume", "auto", "plan=prefix->lora",
                  "prefix.lengths.qformer=4", "eval.num_beams=2")
    assert_one_line(changed, 2, "plan: 'prefix' -> 'prefix->lora'", "prefix.lengths", "stages.1")
    assert "eval.num_beams" not in changed.stderr  # evaluation settings may change
    assert (out / "r" / "recipe.yaml").read_text() == recipe

    from ptscale.models.pretrain import new_tiny_model

    new_tiny_model("tiny-blip2-opt", seed=1)[0].save_pretrained(weights)  # other weights, same place
    moved = cli(TRAIN, "--resume", str(out / "r"))
    assert_one_line(moved, 2, "backbone changed")
    evaluated = cli("-m", "ptscale.cli", "eval", str(out / "r"))
    assert_one_line(evaluated, 2, "backbone changed")

    newest = list_checkpoints(out / "r" / "checkpoints")[-1]
    (newest / "tuned.safetensors").write_bytes((newest / "tuned.safetensors").read_bytes()[:100])  # torn
    new_tiny_model("tiny-blip2-opt", seed=0)[0].save_pretrained(weights)  # the original weights again
    torn = cli(TRAIN, "--resume", str(out / "r"))
    assert_one_line(torn, 3, str(newest / "tuned.safetensors"), "delete")

    fresh = cli(TRAIN, f"output_dir={out}", "run_name=new", f"model.path={weights}", "--resume", "auto", *FAST[:4],
                "plan=prefix", "methods.prefix.steps=1")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "no complete checkpoint in" in fresh.stderr and "starting a fresh run" in fresh.stderr


@pytest.mark.slow
def test_diverging_weights_are_never_checkpointed_and_the_stop_names_a_sound_one(tmp_path, blip2_dir):
    out = tmp_path / "out"
    proc = cli(TRAIN, f"output_dir={out}", "run_name=r", f"model.path={blip2_dir}", "plan=prefix", *FAST[:3],
               "checkpoint.every_steps=1", "checkpoint.keep_last=100", "methods.prefix.steps=30",
               "methods.prefix.lr=1e6", "methods.prefix.warmup_ratio=0", "methods.prefix.max_grad_norm=1e9")
    line = assert_one_line(proc, 1, "training stopped")
    assert "not finite" in line or "non-finite" in line
    for ckpt in list_checkpoints(out / "r" / "checkpoints"):
        for name in ("tuned.safetensors", "optimizer.safetensors"):
            if (ckpt / name).exists():
                assert all(t.isfinite().all() for t in load_file(ckpt / name).values()), ckpt
    sound = list_checkpoints(out / "r" / "checkpoints")
    assert (f"newest sound checkpoint is {sound[-1]}" in line) if sound else ("No sound checkpoint" in line)


@pytest.mark.slow
def test_a_mistake_on_two_ranks_is_one_line_from_each_launch_and_leaves_nothing(tmp_path, blip2_dir):
    """Under the deepspeed launcher every rank finds the mistake, exits 2 without a traceback, and the launcher
    passes the exit code on; rank 0 alone prints the line (the same on every rank)."""
    out = tmp_path / "out"
    proc = subprocess.run([str(BIN / "deepspeed"), "--master_port", free_port(), "--num_gpus", "2", TRAIN,
                           "--ds", "ds_configs/zero3.json", f"output_dir={out}", f"model.path={blip2_dir}",
                           "prefix.lengths.encoder=4", "data.train_size=64"], cwd=ROOT, env=user_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert (proc.stdout + proc.stderr).count("ptscale: error: prefix.lengths") == 1
    assert not out.exists()
