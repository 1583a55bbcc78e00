"""Launching ptscale as a user does, for the tests: one place for the command lines, the environment, the
rendezvous port and the checks every launch makes.

    from tests.launch import ROOT, changed_groups, cli, deepspeed, launch
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ptscale.models.groups import group_of
from ptscale.training.engine import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's deepspeed / torchrun launchers
TRAIN = "launchers/train.py"
_RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR", "LOCAL_WORLD_SIZE")


def user_env() -> dict[str, str]:
    """The environment a user's shell has: no rank variables leaking from a process group of the tests."""
    return {k: v for k, v in os.environ.items() if k not in _RANK_VARIABLES} | {"PYTHONUNBUFFERED": "1"}


def launch(cmd: list[str], timeout: int) -> str:
    """A multi-rank launch (``deepspeed`` or ``torchrun`` first) that must succeed; returns its stdout."""
    # A free rendezvous port per launch: the launchers' default (29500) collides with any other run.
    port = free_port()
    cmd = [cmd[0], "--master_port", port, *cmd[1:]]
    proc = subprocess.run(cmd, cwd=ROOT, env=user_env(), capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    # DeepSpeed's CPU allreduce segments (66 MiB per rank) are unlinked once mapped (engine.init_distributed)
    assert not list(Path("/dev/shm").glob(f"deepspeed_*_{port}_*"))
    return proc.stdout


def deepspeed(ranks: int, *args: str, timeout: int = 900) -> str:
    """``deepspeed --num_gpus N launchers/train.py --ds ds_configs/zero3.json ARGS`` (the README's command)."""
    return launch([str(BIN / "deepspeed"), "--num_gpus", str(ranks), TRAIN, "--ds", "ds_configs/zero3.json", *args],
                  timeout)


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python ARGS`` in the checkout (e.g. ``cli(TRAIN, "plan=lora")``), whatever its exit code."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=user_env())


def assert_one_line(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """A user's mistake: exit ``code``, no traceback, exactly one ``ptscale...`` line holding every needle."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("ptscale")]
    assert len(lines) == 1, out[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def last_program_line(out: str) -> str:
    """The launcher itself logs "[date] [INFO] [launch.py...] exits successfully" after the ranks end."""
    return [line for line in out.strip().splitlines() if "[launch.py" not in line][-1]


def changed_groups(stage_dir: Path) -> set[str]:
    """The parameter groups a stage changed, from the digests it saved before and after."""
    digests = json.loads((stage_dir / "param_digests.json").read_text())
    return {group_of(n) for n, h in digests["before"].items() if digests["after"][n] != h}


def prefix_then_lora_learns_on_two_ranks(tmp_path: Path, run_name: str, recipe: list[str]) -> None:
    """A captioning recipe ``recipe`` (model, plan prefix->lora, its prefix and LoRA placement) trained by the
    deepspeed launcher on 2 ranks under ZeRO-3 with 8 LoRA epochs at 3e-3 (the default budget does not learn the
    embedded default's long downstream captions on the tiny BLIP / VinVL): CIDEr after training above before, and
    each stage changed exactly its groups."""
    out = deepspeed(2, f"output_dir={tmp_path}", f"run_name={run_name}", *recipe, "methods.prefix.evaluate=false",
                    "methods.lora.epochs=8", "methods.lora.lr=3.0e-3", "checkpoint.every_steps=0", timeout=1800)
    run = tmp_path / run_name
    assert last_program_line(out) == f"run directory: {run}"
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2
    points = {e["point"]: e["metrics"] for e in results["evaluations"]}
    assert list(points) == ["before training", "prefix+lora"]
    assert points["prefix+lora"]["CIDEr"] > points["before training"]["CIDEr"]
    assert changed_groups(run / "stage-1-prefix") == {"prefix"}
    assert changed_groups(run / "stage-2-prefix+lora") == {"prefix", "lora"}
