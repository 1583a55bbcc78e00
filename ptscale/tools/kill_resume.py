"""Kill-and-resume check: SIGKILL a 2-rank ZeRO-3 run at chosen points, resume it with --resume auto,
and compare the final trainable weights with an uninterrupted run.

    python -m ptscale.tools.kill_resume --points 10 --out /tmp/killsweep
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from ptscale.checkpoint import list_checkpoints, read_checkpoint
from ptscale.training.engine import free_port

ROOT = Path(__file__).resolve().parents[2]
# Short plan: 6 steps of prefix, 6 of prefix+LoRA, a checkpoint every 2 steps, no evaluation.
OVERRIDES = ["eval.before_training=false", "methods.prefix.steps=6", "methods.lora.steps=6",
             "methods.prefix.evaluate=false", "methods.lora.evaluate=false", "checkpoint.every_steps=2",
             "checkpoint.keep_last=100", "data.train_size=256", "log_every=1"]
# Checkpoints in order: stage 1 steps 2, 4; boundary; stage 2 steps 2, 4; boundary.
N_CHECKPOINTS = 6



def launch(out: Path, name: str, *extra: str, ranks: int = 2) -> subprocess.Popen:
    bin_dir = Path(sys.executable).parent
    port = free_port()
    cmd = [str(bin_dir / "deepspeed"), "--master_port", port, "--num_gpus", str(ranks), "launchers/train.py",
           "--ds", "ds_configs/zero3.json", f"output_dir={out}", f"run_name={name}", *OVERRIDES, *extra]
    log = open(out / f"{name}.log", "a")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    proc.master_port = port
    return proc


def remove_shared_memory(port: str) -> None:
    """DeepSpeed's CPU all-reduce keeps a /dev/shm segment per rank, named after the master port; a
    SIGKILLed rank never unlinks it (66 MB each)."""
    for seg in Path("/dev/shm").glob(f"deepspeed_*_{port}_*"):
        seg.unlink(missing_ok=True)


def wait(proc: subprocess.Popen, timeout: float) -> None:
    if proc.wait(timeout=timeout) != 0:
        raise RuntimeError(f"run failed with exit code {proc.returncode}; see its log")


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "stage-2-prefix+lora" / "trainable.safetensors")


def kill_after(out: Path, name: str, n_checkpoints: int, delay: float, timeout: float = 600,
               extra: tuple[str, ...] = ()) -> int:
    """Start a run (``extra``: more recipe overrides), SIGKILL its whole process group once n checkpoints exist
    (+ delay s); returns how many complete checkpoints there were at the kill."""
    proc = launch(out, name, *extra)
    root = out / name / "checkpoints"
    t0 = time.time()
    while len(list_checkpoints(root)) < n_checkpoints:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} ended before its kill point ({n_checkpoints} checkpoints)")
        if time.time() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            raise TimeoutError(f"{name}: no {n_checkpoints} checkpoints after {timeout} s")
        time.sleep(0.05)
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    remove_shared_memory(proc.master_port)
    return len(list_checkpoints(root))


def check_all_loadable(run: Path) -> int:
    found = list_checkpoints(run / "checkpoints")
    for ckpt in found:
        read_checkpoint(ckpt)
    return len(found)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max((a[k] - b[k]).abs().max().item() for k in a)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("runs/kill_resume"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    wait(launch(args.out, "reference"), 900)
    reference = final_weights(args.out / "reference")
    rows = []
    for i in range(args.points):
        n, delay = rng.randint(1, N_CHECKPOINTS - 1), rng.uniform(0.0, 3.0)
        name = f"killed-{i}"
        at_kill = kill_after(args.out, name, n, delay)
        loadable = check_all_loadable(args.out / name)
        wait(launch(args.out, name, "--resume", "auto"), 900)
        diff = max_diff(final_weights(args.out / name), reference)
        rows.append({"run": name, "kill_after_checkpoints": n, "delay_s": round(delay, 2),
                     "checkpoints_at_kill": at_kill, "all_loadable": loadable == at_kill, "max_abs_diff": diff})
        print(json.dumps(rows[-1]), flush=True)
    (args.out / "kill_resume.json").write_text(json.dumps(rows, indent=1))
    bad = [r for r in rows if r["max_abs_diff"] > 1e-6 or not r["all_loadable"]]
    print(f"{len(rows) - len(bad)} passed, {len(bad)} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
