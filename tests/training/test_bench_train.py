"""launchers/bench_train.py runs end to end (1 rank, ZeRO-3, random tiny weights built partitioned) and writes
its JSON: each stage in every mode, the ratio inside the run, the machine, which attention path served. Timings
are not checked here."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_train_writes_rows_for_each_stage_and_mode(tmp_path):
    proc = subprocess.run([sys.executable, "launchers/bench_train.py", "--out", str(tmp_path), "--steps", "1",
                           "--warmup", "1", "model.pretrain_steps=0", "data.train_size=32"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench_train.json").read_text())
    assert report["world_size"] == 1 and report["device"] and "bench_train.py" in report["command"]
    modes = ["baseline", "kernel", "cache", "ptscale"]
    assert [(r["stage"], r["mode"]) for r in report["rows"]] == [
        (stage, mode) for stage in ("prefix", "prefix+lora") for mode in modes]
    for r in report["rows"]:
        assert r["samples_per_s"] > 0 and (r["mode"] == "baseline") == ("speedup_vs_baseline" not in r)
        # the vision tower is frozen in both stages: the cache modes use it, the others run the tower
        assert r["feature_cache"] == (r["mode"] in ("cache", "ptscale"))
        # no CUDA here: every prefix-attention call took the reference path, and the row says so
        assert r["served"] and set(r["served"]) <= {"classic/reference"}, r["served"]
        assert r["mfu"] is None and r["peak_memory_scope"].startswith("process")
    assert "built tiny-blip2-opt under zero.Init" in proc.stdout


@pytest.fixture(scope="module")
def bench_train():
    spec = importlib.util.spec_from_file_location("bench_train_module", ROOT / "launchers" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_flops_by_hand(bench_train):
    sizes = {"vision": {"params": 100, "trainable": 0, "prefix": 0},
             "qformer": {"params": 10, "trainable": 2, "prefix": 0},
             "projection": {"params": 5, "trainable": 0, "prefix": 0},
             "language_model": {"params": 50, "trainable": 0, "prefix": 3}}
    tokens = {"vision": 7, "qformer": 4, "projection": 4, "language_model": 9}
    # vision: frozen, nothing trainable before it -> forward only; the rest: forward + activation backward,
    # and weight gradients for the Q-Former's 2 trainable elements.
    by_hand = 7 * 200 + 4 * (20 + 20 + 4) + 4 * (10 + 10) + 9 * (100 + 100)
    assert bench_train.step_flops(sizes, tokens, vision_ran=True) == by_hand
    assert bench_train.step_flops(sizes, tokens, vision_ran=False) == by_hand - 7 * 200  # cache: no tower
    sizes["vision"]["trainable"] = 1  # a trained tower: backward through it, and its weight gradients
    assert bench_train.step_flops(sizes, tokens, vision_ran=True) == by_hand + 7 * (200 + 2)
