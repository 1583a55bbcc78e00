"""launchers/bench_train.py runs end to end (1 rank, ZeRO-3, random tiny weights built partitioned) and writes
its JSON: each stage in both modes, the ratio inside the run, the machine. Timings are not checked here."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_train_writes_rows_for_each_stage_and_mode(tmp_path):
    proc = subprocess.run([sys.executable, "launchers/bench_train.py", "--out", str(tmp_path), "--steps", "1",
                           "--warmup", "1", "model.pretrain_steps=0", "data.train_size=32"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench_train.json").read_text())
    assert report["world_size"] == 1 and report["device"] and "bench_train.py" in report["command"]
    assert [(r["stage"], r["mode"]) for r in report["rows"]] == [
        ("prefix", "baseline"), ("prefix", "ptscale"), ("prefix+lora", "baseline"), ("prefix+lora", "ptscale")]
    ours = [r for r in report["rows"] if r["mode"] == "ptscale"]
    assert all(r["samples_per_s"] > 0 and r["speedup_vs_baseline"] > 0 for r in ours)
    assert [r["feature_cache"] for r in ours] == [True, True]  # the vision tower is frozen in both stages
    assert "built tiny-blip2-opt under zero.Init" in proc.stdout
