"""A recipe on COCO-format files (Karpathy split JSON + real JPEGs), with bad records in both modes."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT.parent / "shared" / "testdata" / "clipscore_example" / "images"
FAST = ["eval.before_training=false", "eval.num_beams=1", "methods.prefix.steps=2", "methods.lora.steps=2",
        "methods.prefix.batch_size=2", "methods.lora.batch_size=2", "methods.prefix.evaluate=false",
        "checkpoint.every_steps=0", "data.prompt=a photo of"]


@pytest.fixture
def coco_dir(tmp_path):
    root = tmp_path / "coco"
    (root / "train2014").mkdir(parents=True)
    (root / "val2014").mkdir()
    jpgs = sorted(IMAGES.glob("*.jpg"))
    records = []
    for i in range(8):
        name = f"COCO_train2014_{i:012d}.jpg"
        if i == 3:
            pass  # missing image
        elif i == 5:
            data = jpgs[0].read_bytes()
            (root / "train2014" / name).write_bytes(data[: len(data) // 2])  # truncated JPEG
        else:
            shutil.copy(jpgs[i % 2], root / "train2014" / name)
        records.append({"filepath": "train2014", "filename": name, "imgid": i, "split": "train", "cocoid": i,
                        "sentids": [2 * i, 2 * i + 1], "sentences": [
                            {"raw": "a red circle on the left", "tokens": []},
                            {"raw": "a small square", "tokens": []}]})
    for j in range(2):
        name = f"COCO_val2014_{100 + j:012d}.jpg"
        shutil.copy(jpgs[j], root / "val2014" / name)
        records.append({"filepath": "val2014", "filename": name, "imgid": 8 + j, "split": "test", "cocoid": 100 + j,
                        "sentids": [50 + j], "sentences": [{"raw": "a large blue circle", "tokens": []}]})
    (root / "dataset_coco.json").write_text(json.dumps({"images": records, "dataset": "coco"}))
    return root


def _run(tmp_path, coco_dir, mode):
    cmd = [sys.executable, "launchers/train.py", f"output_dir={tmp_path}", "run_name=r", "data.name=coco",
           f"data.karpathy_json={coco_dir / 'dataset_coco.json'}", f"data.image_root={coco_dir}",
           f"data.on_bad_data={mode}", *FAST]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_skip_mode_trains_and_reports_counts(tmp_path, coco_dir):
    proc = _run(tmp_path, coco_dir, "skip")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "skipped bad data this epoch" in proc.stdout
    logged = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    bad = [x for x in logged if x["kind"] == "bad_data"]
    assert bad and all(sum(v for k, v in x.items() if k not in ("global_step", "kind", "stage")) > 0 for x in bad)
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["evaluations"][-1]["metrics"]["CIDEr"] >= 0
    captions = json.loads((tmp_path / "r" / "captions-prefix+lora.json").read_text())
    assert sorted(c["image_id"] for c in captions) == ["100", "101"]


@pytest.mark.slow
def test_error_mode_names_the_file_and_record(tmp_path, coco_dir):
    proc = _run(tmp_path, coco_dir, "error")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "ptscale: data error" in proc.stderr and "Traceback" not in proc.stderr
    assert "COCO_train2014_000000000003.jpg" in proc.stderr or "COCO_train2014_000000000005.jpg" in proc.stderr
    assert "image_id=" in proc.stderr


def test_missing_dataset_file_is_a_recipe_error(tmp_path):
    proc = subprocess.run([sys.executable, "launchers/train.py", "data.name=coco",
                           f"data.karpathy_json={tmp_path / 'nope.json'}", f"data.image_root={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "data.karpathy_json" in proc.stderr and "does not exist" in proc.stderr
