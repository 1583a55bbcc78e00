"""Region features for VinVL: the per-image .npy + .json layout, the synthetic task's own regions, and every bad
file as one line naming it (exit 3 through the command line, before a run directory exists)."""

import json

import numpy as np
import pytest
import torch

from ptscale.data.region_features import BOX_VALUES, read_regions, synthetic_regions
from ptscale.data.synthetic import make_split
from ptscale.errors import DataError
from tests.launch import TRAIN, assert_one_line, cli

DIM = 10 + BOX_VALUES


def _write(directory, image_id, features, tags):
    np.save(directory / f"{image_id}.npy", features)
    (directory / f"{image_id}.json").write_text(json.dumps({"tags": tags}))


def test_reads_features_and_tags(tmp_path):
    features = np.random.default_rng(0).standard_normal((3, DIM))
    _write(tmp_path, "42", features, ["dog", "frisbee"])
    got, tags = read_regions(tmp_path, "42", DIM)
    assert got.dtype == np.float32 and np.array_equal(got, features.astype(np.float32))
    assert tags == ["dog", "frisbee"]


def _bad_npy(path):
    path.write_bytes(b"not an array")


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "7.npy").unlink(), r"7\.npy: missing \(the region features of image 7\)"),
    (lambda d: _bad_npy(d / "7.npy"), r"7\.npy: not a readable \.npy array"),
    (lambda d: np.save(d / "7.npy", np.zeros((2, DIM + 1))),
     r"7\.npy: shape \(2, 17\), expected \(num_regions >= 1, 16\)"),
    (lambda d: np.save(d / "7.npy", np.zeros((0, DIM))), r"shape \(0, 16\)"),
    (lambda d: np.save(d / "7.npy", np.full((1, DIM), np.nan)), r"non-finite values"),
    (lambda d: (d / "7.json").unlink(), r"7\.json: missing \(the object tags of image 7\)"),
    (lambda d: (d / "7.json").write_text("{"), r"7\.json: not valid JSON"),
    (lambda d: (d / "7.json").write_text('{"tags": [1]}'), r'7\.json: no "tags" list of strings'),
])
def test_bad_files_are_one_line_data_errors(tmp_path, damage, message):
    _write(tmp_path, "7", np.zeros((2, DIM), dtype=np.float32), ["cat"])
    damage(tmp_path)
    with pytest.raises(DataError, match=message) as err:
        read_regions(tmp_path, "7", DIM)
    assert "\n" not in str(err.value) and "README 'Region features'" in str(err.value)


def test_synthetic_regions_are_the_shapes_boxes_and_the_whole_image():
    record = make_split("downstream", 1, 0, "train")[0]
    features, tags = synthetic_regions(record["scene"], record["image"], 10)
    assert features.shape == (len(record["scene"]) + 1, DIM)
    assert tags == [o.shape for o in record["scene"]]
    assert np.allclose(features[-1, -BOX_VALUES:], [0, 0, 1, 1, 1, 1])  # the whole image
    for o, row in zip(record["scene"], features, strict=False):
        x1, y1, x2, y2 = row[-6:-2] * 48
        assert x1 <= 8 + 16 * o.cell[1] <= x2 and y1 <= 8 + 16 * o.cell[0] <= y2  # the shape's centre is inside
    again, _ = synthetic_regions(record["scene"], record["image"], 10)
    assert np.array_equal(features, again)  # a fixed projection


@pytest.fixture(scope="module")
def vinvl_dir(tmp_path_factory):
    """A tiny VinVL checkpoint directory (untrained): the command line runs on it without pre-training the default."""
    from ptscale.models.vinvl import new_tiny_vinvl

    path = tmp_path_factory.mktemp("vinvl")
    model, tokenizer = new_tiny_vinvl("tiny-vinvl", seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow  # a subprocess that loads torch
def test_a_bad_feature_file_stops_the_command_line_in_one_line(tmp_path, vinvl_dir):
    """data.region_features on the synthetic task: every record reads its files; one broken file is exit 3, one
    line, no traceback, no run directory."""
    features = tmp_path / "regions"
    features.mkdir()
    split = make_split("downstream", 4, 1234, "train")
    for r in split:
        _write(features, r["image_id"], np.zeros((2, 70), dtype=np.float32), ["circle"])
    (features / "train-2.npy").write_bytes(b"\x93NUMPY broken")
    proc = cli(TRAIN, f"output_dir={tmp_path / 'out'}", "run_name=r", f"model.path={vinvl_dir}", "plan=prefix",
               f"data.region_features={features}", "data.train_size=4", "data.eval_size=2", timeout=600)
    assert_one_line(proc, 3, "train-2.npy", "not a readable .npy array")
    assert not (tmp_path / "out").exists()


def test_the_collator_reads_the_files(tmp_path, vinvl_dir):
    from ptscale.data.vinvl_collate import VinVLCollator
    from ptscale.models.backbone import load_backbone

    backbone = load_backbone(vinvl_dir)
    records = make_split("downstream", 2, 0, "train")
    for i, r in enumerate(records):
        _write(tmp_path, r["image_id"], np.full((i + 1, 70), float(i), dtype=np.float32), ["circle", "square"][: i + 1])
    collator = VinVLCollator(backbone.tokenizer, backbone.model.config, region_features=str(tmp_path))
    batch = collator.generation_batch(records)
    assert batch["region_mask"].tolist() == [[1, 0], [1, 1]]
    assert torch.equal(batch["region_features"][1], torch.ones(2, 70))
    words = backbone.tokenizer.convert_ids_to_tokens(batch["tag_ids"][1])
    assert words == ["circle", "square", "[SEP]"]


def test_coco_region_features_are_checked_before_training(tmp_path, coco, vinvl_dir):
    """A Karpathy split with data.region_features: every image's files are checked when the splits load (before any
    model is built), and batches read them by the record's image id."""
    from ptscale.config import DataConfig
    from ptscale.data.sources import load_splits
    from ptscale.data.vinvl_collate import VinVLCollator
    from ptscale.models.backbone import load_backbone

    for r in coco["records"]:  # captions in the tiny tokenizer's words
        for sentence in r["sentences"]:
            sentence["raw"] = "a red circle on the left"
    coco["write"](coco["records"])
    features = tmp_path / "regions"
    features.mkdir()
    ids = [str(r["cocoid"]) for r in coco["records"]]
    for i in ids:
        _write(features, i, np.ones((3, 70), dtype=np.float32), ["circle"])
    backbone = load_backbone(vinvl_dir)
    cfg = DataConfig(name="coco", karpathy_json=str(coco["json"]), image_root=str(coco["root"]),
                     region_features=str(features), train_size=0, eval_size=0)
    collator = VinVLCollator(backbone.tokenizer, backbone.model.config, region_features=str(features))
    splits = load_splits(cfg, collator)
    batch = collator.train_batch([splits.train[0], splits.train[1]])
    assert batch["region_features"].shape == (2, 3, 70) and batch["labels"].ne(-100).any()
    (features / f"{ids[0]}.json").unlink()  # an image of the eval split (test)
    with pytest.raises(DataError, match=rf"{ids[0]}\.json: missing"):
        load_splits(cfg, collator)
