"""Karpathy COCO / Flickr30k loaders: splits, expansion, references, and every bad-data case in both modes."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from torch.utils.data import DataLoader

from ptscale.data.bad_data import (
    BadDataError,
    BadDataReport,
    EmptySplitError,
    SkippedRecord,
    collate_skipping,
    iter_clean_batches,
)
from ptscale.data.captions import CaptionDataset, load_karpathy

from .conftest import COCO_RECORDS, captions_for, coco_filename, first_error


def test_coco_test_split_one_item_per_image(coco: dict[str, Any]) -> None:
    ds = load_karpathy(coco["json"], coco["root"], "test")
    assert isinstance(ds.rows, datasets.Dataset) and "image_path" in ds.rows.column_names
    assert (len(ds), ds.num_images, ds.split, ds.per_caption) == (2, 2, "test", False)
    item = ds[0]
    assert set(item) == {"image_id", "image", "captions", "target"}
    assert item["image_id"] == "391895"
    assert item["captions"] == captions_for("391895", 5) and item["target"] == item["captions"][0]
    assert item["image"].mode == "RGB" and item["image"].size == (750, 751)
    assert ds[1]["image_id"] == "522418" and len(ds[1]["captions"]) == 3
    assert ds.rows[0]["image_path"] == str(coco["root"] / "val2014" / coco_filename("val2014", 391895))


def test_coco_train_one_item_per_caption_with_restval(coco: dict[str, Any]) -> None:
    ds = load_karpathy(coco["json"], coco["root"], "train")
    # train 184613 (5) + 318219 (4) + restval 554625 (5)
    assert (ds.num_images, len(ds), ds.per_caption) == (3, 14, True)
    items = [ds[i] for i in range(len(ds))]
    pairs = [(it["image_id"], it["target"]) for it in items]
    expected = [(str(c), cap) for c, _, split, n, _ in COCO_RECORDS if split in ("train", "restval")
                for cap in captions_for(str(c), n)]
    assert pairs == expected
    assert all(it["target"] in it["captions"] and len(it["captions"]) in (4, 5) for it in items)


def test_restval_can_be_kept_out_of_train(coco: dict[str, Any]) -> None:
    train = load_karpathy(coco["json"], coco["root"], "train", restval_as_train=False)
    assert (train.num_images, len(train)) == (2, 9)
    restval = load_karpathy(coco["json"], coco["root"], "restval")
    assert (restval.num_images, len(restval)) == (1, 5) and restval[0]["image_id"] == "554625"
    one_per_image = load_karpathy(coco["json"], coco["root"], "train", train_one_per_caption=False)
    assert len(one_per_image) == 3 and one_per_image[2]["target"] == captions_for("554625", 5)[0]


def test_val_split_and_bad_split_name(coco: dict[str, Any]) -> None:
    assert [load_karpathy(coco["json"], coco["root"], "val")[0]["image_id"]] == ["397133"]
    with pytest.raises(ValueError, match="split must be one of"):
        load_karpathy(coco["json"], coco["root"], "dev")


def test_flickr30k(flickr: dict[str, Any]) -> None:
    test = load_karpathy(flickr["json"], flickr["root"], "test")
    assert len(test) == 1 and test[0]["image_id"] == "1009434119" and test[0]["image"].mode == "RGB"
    train = load_karpathy(flickr["json"], flickr["root"], "train")
    assert (train.num_images, len(train)) == (2, 10)
    assert train.rows[0]["image_path"] == str(flickr["root"] / "1000092795.jpg")
    assert train.references() == {"1000092795": captions_for("1000092795", 5),
                                  "10002456": captions_for("10002456", 5)}


def test_references_and_coco_export_round_trip(coco: dict[str, Any], tmp_path: Path) -> None:
    ds = load_karpathy(coco["json"], coco["root"], "test")
    refs = ds.references()
    assert refs == {"391895": captions_for("391895", 5), "522418": captions_for("522418", 3)}
    path = tmp_path / "refs.json"
    path.write_text(json.dumps(ds.to_coco_annotations()))
    coco_refs = json.loads(path.read_text())
    assert coco_refs["images"] == [{"id": 391895, "file_name": coco_filename("val2014", 391895)},
                                   {"id": 522418, "file_name": coco_filename("val2014", 522418)}]
    ann_ids = [a["id"] for a in coco_refs["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids) == 8
    back: dict[str, list[str]] = {}
    for ann in coco_refs["annotations"]:
        back.setdefault(str(ann["image_id"]), []).append(ann["caption"])
    assert back == refs


def test_dataset_pickles_for_spawned_workers(coco: dict[str, Any]) -> None:
    ds = load_karpathy(coco["json"], coco["root"], "train", on_bad_data="skip")
    back = pickle.loads(pickle.dumps(ds))
    assert len(back) == len(ds) == 14 and back.on_bad_data == "skip"
    assert [back[i]["target"] for i in (0, 13)] == [ds[i]["target"] for i in (0, 13)]
    collate = pickle.loads(pickle.dumps(collate_skipping(list)))
    assert collate([back[0]]).batch[0]["image_id"] == "184613"


def test_compatible_with_caption_collator(coco: dict[str, Any], caption_collator: Any) -> None:
    train = load_karpathy(coco["json"], coco["root"], "train")
    batch = caption_collator.train_batch([train[0], train[7]])
    assert batch["pixel_values"].shape == (2, 3, 8, 8)
    assert batch["input_ids"].shape == batch["labels"].shape
    test = load_karpathy(coco["json"], coco["root"], "test")
    gen = caption_collator.generation_batch([test[0], test[1]])
    assert gen["input_ids"].shape == (2, 3)  # 2 image tokens + BOS, no prompt


# ---------------------------------------------------------------------------------------------- bad images

BAD_IMAGE_CASES = [("missing", "missing_image", "is missing"),
                   ("corrupt", "corrupt_image", "cannot be decoded"),
                   ("truncated", "truncated_image", "truncated")]


@pytest.mark.parametrize(("kind", "reason", "words"), BAD_IMAGE_CASES)
def test_bad_image_error_mode_names_file_and_record(coco: dict[str, Any], kind: str, reason: str,
                                                    words: str) -> None:
    bad = coco["image"](522418, kind)
    ds = load_karpathy(coco["json"], coco["root"], "test", on_bad_data="error")  # images are read lazily
    assert ds[0]["image_id"] == "391895"
    with pytest.raises(BadDataError) as info:
        ds[1]
    message = str(info.value)
    assert words in message and str(bad) in message
    assert "image_id=522418" in message and str(coco["json"]) in message and "split 'test'" in message
    assert "on_bad_data='skip'" in message
    record = info.value.record
    assert record is not None and (record.reason, record.path) == (reason, str(bad))


@pytest.mark.parametrize(("kind", "reason", "words"), BAD_IMAGE_CASES)
def test_bad_image_skip_mode_returns_counted_marker(coco: dict[str, Any], kind: str, reason: str,
                                                    words: str) -> None:
    bad = coco["image"](184613, kind)
    ds = load_karpathy(coco["json"], coco["root"], "train", on_bad_data="skip")
    skipped = ds[0]
    assert isinstance(skipped, SkippedRecord) and not skipped
    assert (skipped.reason, skipped.path, skipped.record_id) == (reason, str(bad), "image_id=184613")
    assert ds[5]["image_id"] == "318219"
    collated = collate_skipping(list)([ds[i] for i in range(len(ds))])
    assert collated.report.counts == {reason: 5} and collated.report.kept == 9  # 5 captions of the bad image
    assert [it["image_id"] for it in collated.batch] == ["318219"] * 4 + ["554625"] * 5


def _loader(ds: CaptionDataset, collate: Any, batch_size: int = 4) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, num_workers=2, collate_fn=collate)


def test_dataloader_workers_error_mode_gives_readable_message(coco: dict[str, Any],
                                                              caption_collator: Any) -> None:
    bad = coco["image"](318219, "truncated")
    ds = load_karpathy(coco["json"], coco["root"], "train", on_bad_data="error")
    err = first_error(_loader(ds, caption_collator.train_batch))
    assert isinstance(err, BadDataError)
    message = str(err)
    first_line = message.splitlines()[0]
    assert not message.startswith("Caught") and "Traceback" not in message
    assert "image file is truncated" in first_line and str(bad) in first_line
    assert "image_id=318219" in first_line and str(coco["json"]) in first_line
    assert "DataLoader worker process" in message
    assert err.worker_traceback is not None and "Traceback" in err.worker_traceback


def test_dataloader_workers_skip_mode_reports_counts_at_epoch_end(coco: dict[str, Any], caption_collator: Any,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    coco["image"](184613, "missing")  # 5 training pairs
    coco["image"](554625, "corrupt")  # 5 training pairs
    ds = load_karpathy(coco["json"], coco["root"], "train", on_bad_data="skip")
    loader = _loader(ds, collate_skipping(caption_collator.train_batch))
    report = BadDataReport()
    sizes = []
    with caplog.at_level(logging.WARNING, logger="ptscale.data.bad_data"):
        for batch in iter_clean_batches(loader, report):
            assert isinstance(batch["input_ids"], torch.Tensor)
            sizes.append(batch["pixel_values"].shape[0])
    # 14 pairs in batches of 4: [bad x4], [bad, ok x3], [ok, bad x3], [bad x2] -> two non-empty batches
    assert sizes == [3, 1]
    assert report.counts == {"missing_image": 5, "corrupt_image": 5} and report.kept == 4
    logged = [r.getMessage() for r in caplog.records]
    assert any("missing_image=5" in m and str(coco["json"]) in m for m in logged)
    # Reports from several epochs (or ranks) add up.
    for _ in iter_clean_batches(loader, report):
        pass
    assert report.counts == {"missing_image": 10, "corrupt_image": 10} and report.kept == 8


def test_every_image_bad_skip_mode_is_empty_split(coco: dict[str, Any], caption_collator: Any) -> None:
    coco["image"](391895, "corrupt")
    coco["image"](522418, "missing")
    ds = load_karpathy(coco["json"], coco["root"], "test", on_bad_data="skip")
    report = BadDataReport()
    with pytest.raises(EmptySplitError) as info:
        for _ in iter_clean_batches(_loader(ds, collate_skipping(caption_collator.generation_batch)), report):
            pytest.fail("no batch should come out")
    assert info.value.split == "test" and info.value.source == str(coco["json"])
    assert "every record" in str(info.value) and "corrupt_image=1" in str(info.value)


# ----------------------------------------------------------------------------------------------- bad text

def _with_captions(coco: dict[str, Any], cocoid: int, raws: list[str]) -> Path:
    records = coco["records"]
    record = next(r for r in records if r.get("cocoid") == cocoid)
    for sentence, raw in zip(record["sentences"], raws, strict=False):
        sentence["raw"] = raw
    record["sentences"] = record["sentences"][: len(raws)]
    return coco["write"](records)


def test_empty_caption_error_mode(coco: dict[str, Any]) -> None:
    _with_captions(coco, 391895, ["a dog", "   ", "a cat"])
    with pytest.raises(BadDataError) as info:
        load_karpathy(coco["json"], coco["root"], "test", on_bad_data="error")
    message = str(info.value)
    assert "caption is empty" in message and str(coco["json"]) in message and "image_id=391895" in message
    assert "sentence 1" in message and "sentid 1" in message


def test_empty_caption_skip_mode_drops_caption_keeps_record(coco: dict[str, Any]) -> None:
    _with_captions(coco, 391895, ["a dog ", "", "a cat"])
    ds = load_karpathy(coco["json"], coco["root"], "test", on_bad_data="skip")
    assert ds.references()["391895"] == ["a dog", "a cat"]
    assert ds.load_report.counts == {"empty_caption": 1} and ds.load_report.kept == 2


def test_record_without_captions_is_bad(coco: dict[str, Any]) -> None:
    _with_captions(coco, 318219, ["", " "])
    ds = load_karpathy(coco["json"], coco["root"], "train", on_bad_data="skip")
    assert ds.num_images == 2 and len(ds) == 10 and "318219" not in ds.references()
    assert ds.load_report.counts == {"empty_caption": 2, "no_captions": 1}
    _with_captions(coco, 318219, [])
    with pytest.raises(BadDataError, match="no non-empty caption.*image_id=318219"):
        load_karpathy(coco["json"], coco["root"], "train", on_bad_data="error")


def test_malformed_record(coco: dict[str, Any]) -> None:
    records = coco["records"]
    del records[0]["filename"]
    coco["write"](records)
    with pytest.raises(BadDataError, match="malformed"):
        load_karpathy(coco["json"], coco["root"], "test")
    ds = load_karpathy(coco["json"], coco["root"], "test", on_bad_data="skip")
    assert len(ds) == 1 and ds.load_report.counts == {"malformed_record": 1}


@pytest.mark.parametrize("on_bad_data", ["skip", "error"])
def test_split_without_examples_is_an_error(coco: dict[str, Any], on_bad_data: str) -> None:
    coco["write"]([r for r in coco["records"] if r["split"] != "val"])
    with pytest.raises(EmptySplitError) as info:
        load_karpathy(coco["json"], coco["root"], "val", on_bad_data=on_bad_data)
    assert info.value.split == "val" and str(coco["json"]) in str(info.value)
    assert "splits present: ['restval', 'test', 'train']" in str(info.value)
    coco["write"]([])
    with pytest.raises(EmptySplitError, match="split 'test'"):
        load_karpathy(coco["json"], coco["root"], "test", on_bad_data=on_bad_data)


def test_all_records_skipped_at_load_is_empty_split(coco: dict[str, Any]) -> None:
    _with_captions(coco, 397133, [""])
    with pytest.raises(EmptySplitError) as info:
        load_karpathy(coco["json"], coco["root"], "val", on_bad_data="skip")
    assert "all 1 records were dropped as bad" in str(info.value) and "no_captions=1" in str(info.value)
    with pytest.raises(BadDataError, match="caption is empty"):
        load_karpathy(coco["json"], coco["root"], "val", on_bad_data="error")


def test_not_a_karpathy_file(tmp_path: Path, coco: dict[str, Any]) -> None:
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="not a Karpathy split file"):
        load_karpathy(path, coco["root"], "test")
