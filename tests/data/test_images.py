"""load_image on real and broken files, and the bad-data machinery (errors, reports, skipping collate)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from ptscale.data.bad_data import (
    MAX_EXAMPLES,
    BadDataError,
    BadDataReport,
    BadRecord,
    Collated,
    EmptySplitError,
    SkippedRecord,
    check_policy,
    collate_skipping,
    iter_clean_batches,
)
from ptscale.data.images import load_image

from .conftest import MakeImage


def test_real_jpeg_is_fully_decoded_rgb(tmp_path: Path, make_image: MakeImage) -> None:
    path = make_image(tmp_path / "a.jpg", "image1")
    img = load_image(path, "image_id=1")
    path.unlink()  # decoded completely: no lazy reads from the file are left
    assert img.mode == "RGB" and img.size == (750, 751)
    assert len(img.tobytes()) == 750 * 751 * 3


def test_grey_png_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "grey.png"
    Image.new("L", (5, 4), 128).save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (128, 128, 128)


@pytest.mark.parametrize(("kind", "reason", "words"), [
    ("missing", "missing_image", "image file is missing"),
    ("corrupt", "corrupt_image", "cannot be decoded"),
    ("truncated", "truncated_image", "truncated"),
])
def test_bad_files_raise_bad_record(tmp_path: Path, make_image: MakeImage, kind: str, reason: str,
                                    words: str) -> None:
    path = make_image(tmp_path / "img.jpg", kind)
    with pytest.raises(BadRecord) as info:
        load_image(path, "image_id=42")
    err = info.value
    assert (err.reason, err.path, err.record_id) == (reason, str(path), "image_id=42")
    message = str(err)
    assert words in message and str(path) in message and "image_id=42" in message
    assert "on_bad_data='skip'" in message and "To fix:" in message


def test_truncated_jpeg_really_is_truncated(tmp_path: Path, make_image: MakeImage) -> None:
    # The file opens (the header is intact); only a full decode finds the missing half.
    path = make_image(tmp_path / "half.jpg", "truncated")
    with Image.open(path) as img:
        assert img.format == "JPEG"
    with pytest.raises(BadRecord, match="truncated"):
        load_image(path)


def test_directory_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(BadRecord) as info:
        load_image(tmp_path)
    assert info.value.reason == "unreadable_image"


def test_refuses_to_run_with_load_truncated_images(tmp_path: Path, make_image: MakeImage,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        load_image(make_image(tmp_path / "a.jpg", "truncated"))


def test_bad_record_pickles_and_locates() -> None:
    err = BadRecord("/x/a.jpg", "image_id=7", "corrupt_image", "bad header")
    back = pickle.loads(pickle.dumps(err))
    assert (back.path, back.record_id, back.reason) == ("/x/a.jpg", "image_id=7", "corrupt_image")
    assert back.detail == "bad header" and str(back) == str(err)
    located = err.located("split 'test' of /x/dataset_coco.json")
    assert "record image_id=7 in split 'test' of /x/dataset_coco.json" in str(located)
    empty = EmptySplitError("val", "/x/d.json", "nothing")
    assert str(pickle.loads(pickle.dumps(empty))) == str(empty)


def test_bad_data_error_cleans_worker_reraise_message() -> None:
    # What torch's ExceptionWrapper.reraise hands to the constructor for an error raised in a worker.
    original = "image file is missing: /x/a.jpg; record image_id=7."
    worker_message = ("Caught BadDataError in DataLoader worker process 1.\nOriginal Traceback (most recent "
                      "call last):\n  File \"x.py\", line 3, in f\n    raise BadDataError(str(located))\n"
                      f"ptscale.data.bad_data.BadDataError: {original}\n")
    err = BadDataError(worker_message)
    assert str(err) == f"{original} (raised in DataLoader worker process 1)"
    assert err.worker_traceback == worker_message
    assert str(BadDataError("plain")) == "plain" and BadDataError("plain").worker_traceback is None


def test_policy_is_checked() -> None:
    assert check_policy("skip") == "skip"
    with pytest.raises(ValueError, match="on_bad_data"):
        check_policy("ignore")


def test_report_merge_and_summary() -> None:
    a, b = BadDataReport(kept=3), BadDataReport(kept=2)
    a.add("missing_image", "missing_image: /x/1.jpg")
    b.add("missing_image", "missing_image: /x/2.jpg")
    b.add("truncated_image", "truncated_image: /x/3.jpg")
    total = BadDataReport.merged([a, b])
    assert total.counts == {"missing_image": 2, "truncated_image": 1}
    assert (total.kept, total.skipped) == (5, 3)
    assert total.examples == ["missing_image: /x/1.jpg", "missing_image: /x/2.jpg",
                              "truncated_image: /x/3.jpg"]
    summary = total.summary()
    assert summary.startswith("skipped 3 bad records (kept 5): missing_image=2, truncated_image=1")
    assert "/x/3.jpg" in summary
    assert a.counts == {"missing_image": 1}  # merged() builds a new report
    assert BadDataReport(kept=4).summary() == "no bad records; kept 4"


def test_report_examples_are_capped() -> None:
    report = BadDataReport()
    for k in range(MAX_EXAMPLES + 5):
        report.add("corrupt_image", f"e{k}")
    other = BadDataReport()
    other.add("corrupt_image", "late")
    report.merge(other)
    assert report.counts == {"corrupt_image": MAX_EXAMPLES + 6}
    assert len(report.examples) == MAX_EXAMPLES and "late" not in report.examples


def test_skipping_collate_filters_and_counts() -> None:
    skipped = SkippedRecord("/x/a.jpg", "image_id=1", "missing_image")
    assert not skipped
    collate = collate_skipping(lambda items: [i["v"] for i in items])
    out = collate([{"v": 1}, skipped, None, {"v": 2}])
    assert isinstance(out, Collated) and out.batch == [1, 2]
    assert out.report.counts == {"missing_image": 1, "unknown": 1} and out.report.kept == 2
    all_bad = collate([skipped])
    assert all_bad.batch is None and all_bad.report.kept == 0


def test_iter_clean_batches_merges_and_refuses_plain_batches() -> None:
    skipped = SkippedRecord("/x/a.jpg", "image_id=1", "corrupt_image")
    collate = collate_skipping(list)
    batches = [collate([{"v": 1}, skipped]), collate([skipped]), collate([{"v": 2}])]
    report = BadDataReport()
    clean = list(iter_clean_batches(batches, report, split="train", source="d.json"))
    assert clean == [[{"v": 1}], [{"v": 2}]]
    assert report.counts == {"corrupt_image": 2} and report.kept == 2
    with pytest.raises(TypeError, match="collate_skipping"):
        list(iter_clean_batches([[1, 2]], BadDataReport(), split="train", source="d.json"))
    with pytest.raises(EmptySplitError, match="no batches"):
        list(iter_clean_batches([], BadDataReport(), split="train", source="d.json"))
