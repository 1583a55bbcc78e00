"""launchers/gpu_check.py in its CPU smoke mode (Triton interpreter, tiny shapes): every step runs end to end
and writes the report a GPU run would, so a lent GPU's minutes are not spent finding a broken script."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launchers" / "gpu_check.py"


def _smoke(step: str, out: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = os.environ | {"TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'kernels'}"}
    proc = subprocess.run([sys.executable, str(SCRIPT), step, "--smoke", "--out", str(out), *extra], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_rel_and_worst_never_pass_a_nan():
    spec = importlib.util.spec_from_file_location("gpu_check_module", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import torch

    assert module.rel(torch.tensor([1.0, float("nan")]), torch.ones(2)) == math.inf
    assert module.rel(None, torch.ones(2)) == math.inf
    assert module.worst([1e-6, float("nan"), 2e-6]) == math.inf  # max() would return 2e-6 here
    assert module.worst([1e-6, 3e-6]) == 3e-6


def test_kernels_smoke(tmp_path):
    _, report = _smoke("kernels", tmp_path / "kernels.json")
    assert report["device"].startswith("cpu") and report["errors"] == []
    assert {c["kind"] for c in report["checks"]} == {"classic", "plus"}
    assert all(c["passed"] and c["deterministic"] for c in report["checks"])
    assert report["summary"] == {"checks": len(report["checks"]), "failed_or_errors": 0}
    ours = [t for t in report["timing"] if t["method"] == "ours"]
    assert {t["method"] for t in report["timing"]} == {"ours", "peft", "sdpa_no_prefix"}
    assert ours and all(t["launch"]["head_dim_work"] == t["D"] == 80 for t in ours)  # 64 + 16, not 128


def test_tune_smoke(tmp_path):
    _, report = _smoke("tune", tmp_path / "tune.json")
    (shape,) = report["shapes"]
    assert shape["best"] is not None and all(c["ok"] for c in shape["candidates"])
    table = json.loads((tmp_path / "tuned_sm90.json").read_text())
    assert table["classes"] == {shape["shape_class"]: {"tiles": shape["tiles"], "from": "smoke",
                                                       "candidate": shape["best"]}}


@pytest.mark.slow
def test_training_smoke(tmp_path):
    _, report = _smoke("training", tmp_path / "training.json", "--steps", "1", "--warmup", "1",
                       "model.pretrain_steps=0", "data.train_size=32")
    assert report["errors"] == []
    parity = report["parity"]
    # fp32 on CPU: the interpreted kernel and the reference path agree to rounding.
    assert parity["passed"] and parity["rel_diff"] < 1e-5
    assert set(parity["served"]["triton"]) == {"classic/triton"}
    assert set(parity["served"]["reference"]) == {"classic/reference"}
    assert [(r["stage"], r["mode"]) for r in report["rows"]] == [
        (s, m) for s in ("prefix", "prefix+lora") for m in ("baseline", "kernel", "cache", "ptscale")]
