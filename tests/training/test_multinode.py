"""Two "nodes" on 127.0.0.1: launchers/multinode_torchrun.sh started twice at once (torchrun --nnodes 2
--nproc_per_node 1 --node_rank R --master_addr 127.0.0.1 --master_port P), ZeRO-3 over both, on a short
PT-LoRA plan with a checkpoint every step. It trains to the end; the same plan with both nodes SIGKILLed
once a checkpoint exists, then started again on both, resumes from the newest checkpoint ("resuming
from") and ends with the same trainable weights as the uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil  # a DeepSpeed dependency
import pytest

from ptscale.checkpoint import list_checkpoints
from ptscale.tools.kill_resume import final_weights, max_diff
from ptscale.training.engine import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launchers" / "multinode_torchrun.sh"
PLAN = ["eval.before_training=false", "methods.prefix.steps=3", "methods.lora.steps=3", "methods.prefix.evaluate=false",
        "methods.lora.evaluate=false", "data.train_size=64", "checkpoint.every_steps=1"]
SHM = Path("/dev/shm")


def _start_nodes(out: Path, name: str, attempt: str) -> list[subprocess.Popen]:
    """Both nodes at once, each in its own process group (a node = a torchrun agent and its worker)."""
    port = free_port()
    procs = []
    for node in (0, 1):
        env = {**os.environ, "NNODES": "2", "NODE_RANK": str(node), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "NPROC_PER_NODE": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
            env.pop(key, None)
        with open(out / f"{name}-{attempt}-node{node}.log", "w") as log:  # the child keeps its own handle
            procs.append(subprocess.Popen(["bash", str(SCRIPT), f"output_dir={out}", f"run_name={name}", *PLAN],
                                          cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    return procs


def _workers(procs: list[subprocess.Popen]) -> list[psutil.Process]:
    """The train.py processes under each agent (torch elastic starts them in sessions of their own)."""
    found = []
    for p in procs:
        try:
            found += [c for c in psutil.Process(p.pid).children(recursive=True) if "train.py" in " ".join(c.cmdline())]
        except psutil.NoSuchProcess:
            pass
    return found


def _kill(procs: list[subprocess.Popen]) -> None:
    """SIGKILL whole nodes: the agents' process groups and their workers (a SIGKILLed agent alone would
    leave its workers training)."""
    workers = _workers(procs)
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    for w in workers:
        try:
            w.kill()
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        p.wait()
    psutil.wait_procs(workers, timeout=30)


def _wait(procs: list[subprocess.Popen], out: Path, name: str, attempt: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    try:
        for node, p in enumerate(procs):
            code = p.wait(timeout=max(1.0, deadline - time.time()))
            assert code == 0, f"node {node} exited {code}:\n{_log(out, name, attempt, node)[-4000:]}"
    finally:
        _kill(procs)


def _log(out: Path, name: str, attempt: str, node: int | None = None) -> str:
    nodes = (0, 1) if node is None else (node,)
    return "".join((out / f"{name}-{attempt}-node{n}.log").read_text() for n in nodes)


def _until(condition, procs: list[subprocess.Popen], what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert all(p.poll() is None for p in procs), f"a node ended before {what}"
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


@pytest.fixture(scope="module", autouse=True)
def _no_leaked_shm() -> Iterator[None]:
    """DeepSpeed's CPU shm allreduce never unlinks its 66 MiB /dev/shm segment per rank (nor can a killed
    run): remove the ones these runs left, once no live process maps them."""
    before = {p.name for p in SHM.glob("deepspeed_allreduce_buffer_*")}
    yield
    mapped = set()
    for proc in psutil.process_iter():
        try:
            mapped |= {m.path for m in proc.memory_maps(grouped=True) if m.path.startswith(str(SHM))}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    for segment in SHM.glob("deepspeed_allreduce_buffer_*"):
        if segment.name not in before and str(segment) not in mapped:
            segment.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("multinode")
    _wait(_start_nodes(out, "mn", "first"), out, "mn", "first")
    return out, final_weights(out / "mn")


@pytest.mark.slow
def test_two_nodes_train_to_the_end(uninterrupted):
    out, weights = uninterrupted
    node0 = _log(out, "mn", "first", 0)  # node 0 runs global rank 0
    assert f"run directory: {out / 'mn'}" in node0
    assert "no complete checkpoint" in node0  # --resume auto on a fresh run starts fresh
    assert weights and all(v.numel() > 0 for v in weights.values())
    assert list_checkpoints(out / "mn" / "checkpoints")


@pytest.mark.slow
def test_both_nodes_killed_and_restarted_resume_from_the_newest_checkpoint(uninterrupted):
    out, reference = uninterrupted
    name = "mn-killed"
    root = out / name / "checkpoints"
    procs = _start_nodes(out, name, "first")
    try:
        _until(lambda: list_checkpoints(root), procs, "first checkpoint")
    finally:
        _kill(procs)  # both nodes lost: agents and workers SIGKILLed, no cleanup
    at_kill = list_checkpoints(root)[-1].name
    assert not (out / name / "stage-2-prefix+lora").exists(), "the run finished before the nodes were killed"

    _wait(_start_nodes(out, name, "second"), out, name, "second")
    node0 = _log(out, name, "second", 0)
    resumed = node0.split("resuming from", 1)
    assert len(resumed) == 2 and at_kill in resumed[1].splitlines()[0]
    assert f"run directory: {out / name}" in node0
    assert max_diff(final_weights(out / name), reference) <= 1e-6
