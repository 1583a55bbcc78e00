"""VQAv2 loader: official files, targets, test split, image paths, and bad data in both modes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pytest
from torch.utils.data import DataLoader

from ptscale.data.bad_data import (
    BadDataError,
    BadDataReport,
    EmptySplitError,
    SkippedRecord,
    collate_skipping,
    iter_clean_batches,
)
from ptscale.data.vqa import load_vqav2, most_frequent_answer

from .conftest import VQA_QUESTIONS, MakeImage, first_error, vqa_image_path


def test_val_items(vqa: dict[str, Any]) -> None:
    ds = load_vqav2(vqa["questions"], vqa["annotations"], vqa["root"])
    assert isinstance(ds.rows, datasets.Dataset) and ds.has_answers
    assert (len(ds), ds.split, ds.source) == (4, "val2014", str(vqa["questions"]))
    item = ds[0]
    assert set(item) == {"question_id", "image_id", "image", "question", "prompt", "answers", "target",
                         "answer_type", "question_type"}
    assert (item["question_id"], item["image_id"]) == (3918950, "391895")
    assert item["question"] == "What is the man riding?"
    assert item["prompt"] == "Question: What is the man riding? Answer:"
    assert item["answers"] == ["bike"] * 7 + ["bicycle"] * 3 and item["target"] == "bike"
    assert (item["answer_type"], item["question_type"]) == ("other", "what is")
    assert item["image"].mode == "RGB" and item["image"].size == (750, 751)
    assert ds.rows[2]["image_path"] == str(vqa_image_path(vqa["root"], "val2014", 522418))


def test_targets_break_ties_with_multiple_choice_answer(vqa: dict[str, Any]) -> None:
    ds = load_vqav2(vqa["questions"], vqa["annotations"], vqa["root"])
    # 5 x "2" vs 5 x "two" with multiple_choice_answer "two"; red 4 / blue 4 / green 2 with mca "green".
    assert [ds.rows[i]["target"] for i in range(4)] == ["bike", "yes", "two", "red"]
    assert most_frequent_answer(["2"] * 5 + ["two"] * 5, "2") == "2"
    assert most_frequent_answer(["a", "b", "b", "a"], None) == "a"
    assert most_frequent_answer(["a", "b", "b"], "a") == "b"  # the official answer only breaks ties


def test_custom_prompt_and_image_format(vqa: dict[str, Any], make_image: MakeImage) -> None:
    flat = vqa["root"].parent / "flat"
    make_image(flat / "391895.jpg", "image1")
    make_image(flat / "522418.jpg", "image2")
    ds = load_vqav2(vqa["questions"], vqa["annotations"], flat, prompt="Q: {} A:",
                    image_format="{image_root}/{image_id}.jpg")
    item = ds[3]
    assert item["prompt"] == "Q: What color is the shirt? A:" and item["image"].size == (750, 751)
    with pytest.raises(ValueError, match="prompt must contain"):
        load_vqav2(vqa["questions"], vqa["annotations"], flat, prompt="Question:")


def test_test_dev_split_without_annotations(tmp_path: Path, make_image: MakeImage) -> None:
    # test-dev questions point at the test2015 images.
    root = tmp_path / "coco"
    make_image(vqa_image_path(root, "test2015", 262144), "image1")
    questions = tmp_path / "v2_OpenEnded_mscoco_test-dev2015_questions.json"
    records = [{"image_id": 262144, "question": "Is it?", "question_id": 1}]
    questions.write_text(json.dumps({"data_subtype": "test-dev2015", "questions": records}))
    ds = load_vqav2(questions, None, root)
    assert not ds.has_answers and ds.split == "test-dev2015"
    item = ds[0]
    assert (item["answers"], item["target"], item["answer_type"]) == ([], None, None)
    assert item["prompt"] == "Question: Is it? Answer:" and item["image"].mode == "RGB"


def test_data_subtype_is_required(vqa: dict[str, Any]) -> None:
    data = json.loads(vqa["questions"].read_text())
    del data["data_subtype"]
    vqa["questions"].write_text(json.dumps(data))
    with pytest.raises(ValueError, match="data_subtype"):
        load_vqav2(vqa["questions"], vqa["annotations"], vqa["root"])
    assert len(load_vqav2(vqa["questions"], vqa["annotations"], vqa["root"], data_subtype="val2014")) == 4


# ---------------------------------------------------------------------------------------------- bad images

@pytest.mark.parametrize(("kind", "reason"), [("missing", "missing_image"), ("corrupt", "corrupt_image"),
                                              ("truncated", "truncated_image")])
def test_bad_image_both_modes(vqa: dict[str, Any], make_image: MakeImage, kind: str, reason: str) -> None:
    bad = vqa_image_path(vqa["root"], "val2014", 522418)
    bad.unlink()
    make_image(bad, kind)
    error = load_vqav2(vqa["questions"], vqa["annotations"], vqa["root"], on_bad_data="error")
    assert error[0]["target"] == "bike"
    with pytest.raises(BadDataError) as info:
        error[2]
    message = str(info.value)
    assert str(bad) in message and "question_id=5224180 image_id=522418" in message
    assert str(vqa["questions"]) in message
    skip = load_vqav2(vqa["questions"], vqa["annotations"], vqa["root"], on_bad_data="skip")
    marker = skip[3]
    assert isinstance(marker, SkippedRecord) and (marker.reason, marker.path) == (reason, str(bad))


def test_dataloader_workers_both_modes(vqa: dict[str, Any]) -> None:
    bad = vqa_image_path(vqa["root"], "val2014", 391895)
    bad.write_bytes(bad.read_bytes()[:1000])
    error = load_vqav2(vqa["questions"], vqa["annotations"], vqa["root"], on_bad_data="error")
    err = first_error(DataLoader(error, batch_size=2, num_workers=2, collate_fn=list))
    assert isinstance(err, BadDataError) and "Traceback" not in str(err)
    assert "truncated" in str(err) and "question_id=3918950" in str(err) and str(bad) in str(err)
    skip = load_vqav2(vqa["questions"], vqa["annotations"], vqa["root"], on_bad_data="skip")
    loader = DataLoader(skip, batch_size=1, num_workers=2, collate_fn=collate_skipping(list))
    report = BadDataReport()
    ids = [item["question_id"] for batch in iter_clean_batches(loader, report) for item in batch]
    assert ids == [5224180, 5224181]
    assert report.counts == {"truncated_image": 2} and report.kept == 2


# ----------------------------------------------------------------------------------------------- bad text

def test_question_without_answers(vqa: dict[str, Any]) -> None:
    anns = vqa["annotation_records"]
    anns[1]["answers"] = []
    vqa["write"](vqa["question_records"], anns[:3])  # and question 5224181 has no annotation at all
    with pytest.raises(BadDataError) as info:
        load_vqav2(vqa["questions"], vqa["annotations"], vqa["root"], on_bad_data="error")
    message = str(info.value)
    assert "question has no answers" in message and "question_id=3918951" in message
    assert str(vqa["annotations"]) in message
    ds = load_vqav2(vqa["questions"], vqa["annotations"], vqa["root"], on_bad_data="skip")
    assert [ds.rows[i]["question_id"] for i in range(len(ds))] == [3918950, 5224180]
    assert ds.load_report.counts == {"no_answers": 2} and ds.load_report.kept == 2


def test_empty_question(vqa: dict[str, Any]) -> None:
    questions = vqa["question_records"]
    questions[0]["question"] = "  "
    vqa["write"](questions, vqa["annotation_records"])
    with pytest.raises(BadDataError, match=r"question is empty.*question_id=3918950"):
        load_vqav2(vqa["questions"], vqa["annotations"], vqa["root"])
    ds = load_vqav2(vqa["questions"], vqa["annotations"], vqa["root"], on_bad_data="skip")
    assert len(ds) == 3 and ds.load_report.counts == {"empty_question": 1}


def test_annotation_for_another_image_is_malformed(vqa: dict[str, Any]) -> None:
    anns = vqa["annotation_records"]
    anns[0]["image_id"] = 1
    vqa["write"](vqa["question_records"], anns)
    with pytest.raises(BadDataError, match="malformed.*annotated with image_id 1"):
        load_vqav2(vqa["questions"], vqa["annotations"], vqa["root"])


@pytest.mark.parametrize("on_bad_data", ["skip", "error"])
def test_no_questions_is_empty_split(vqa: dict[str, Any], on_bad_data: str) -> None:
    vqa["write"]([], [])
    with pytest.raises(EmptySplitError) as info:
        load_vqav2(vqa["questions"], vqa["annotations"], vqa["root"], on_bad_data=on_bad_data)
    assert info.value.split == "val2014" and info.value.source == str(vqa["questions"])
    assert "has no questions" in str(info.value)


def test_every_question_skipped_is_empty_split(vqa: dict[str, Any]) -> None:
    vqa["write"](vqa["question_records"], [])
    with pytest.raises(EmptySplitError, match=f"all {len(VQA_QUESTIONS)} records were dropped.*no_answers=4"):
        load_vqav2(vqa["questions"], vqa["annotations"], vqa["root"], on_bad_data="skip")


def test_every_image_bad_is_empty_epoch(vqa: dict[str, Any]) -> None:
    for image_id in (391895, 522418):
        vqa_image_path(vqa["root"], "val2014", image_id).unlink()
    ds = load_vqav2(vqa["questions"], vqa["annotations"], vqa["root"], on_bad_data="skip")
    loader = DataLoader(ds, batch_size=2, collate_fn=collate_skipping(list))
    with pytest.raises(EmptySplitError, match=r"split 'val2014'.*every record.*missing_image=4"):
        list(iter_clean_batches(loader, BadDataReport()))
