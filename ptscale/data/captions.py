"""COCO and Flickr30k captioning in the Karpathy splits (``dataset_coco.json``, ``dataset_flickr30k.json``).

Both files have the shape ``{"images": [{"filename", "split", "sentences": [{"raw", ...}], ...}]}``; COCO
records also carry ``filepath`` (``train2014``/``val2014``) and ``cocoid``. Image ids are the COCO ids
(``cocoid``), and for Flickr30k the file name without extension (``1000092795``), as in the official
caption annotations of each dataset.

Training splits give one example per (image, caption) pair, as LAVIS does; evaluation splits give one
example per image with all its references. ``restval`` (30,504 COCO images) joins ``train`` by default,
as in LAVIS and most captioning work (113,287 training images); ``restval_as_train=False`` keeps ``train``
to the 82,783 images of the original Karpathy train split.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image

from ptscale.config import KARPATHY_SPLITS
from ptscale.data.bad_data import BadDataReport, BadRecord, EmptySplitError, OnBadData, check_policy, reject
from ptscale.data.images import LazyImageDataset, empty_split_detail
from ptscale.errors import MalformedDataError, read_json_file

logger = logging.getLogger(__name__)

TRAIN_SPLITS = ("train", "restval")

FEATURES = datasets.Features({
    "image_id": datasets.Value("string"),
    "file_name": datasets.Value("string"),
    "image_path": datasets.Value("string"),
    "captions": datasets.List(datasets.Value("string")),
})


class CaptionDataset(LazyImageDataset):
    """Items ``{"image_id", "image", "captions", "target"}``: the records ``CaptionCollator`` consumes.

    ``rows`` holds one row per image; with ``per_caption`` each caption of an image is its own item
    (``target`` is that caption), otherwise each image is one item and ``target`` is its first reference.
    """

    def __init__(self, rows: datasets.Dataset, *, split: str, source: str | os.PathLike[str],
                 image_root: str | os.PathLike[str], on_bad_data: OnBadData, load_report: BadDataReport,
                 per_caption: bool) -> None:
        super().__init__(rows, split=split, source=source, on_bad_data=on_bad_data, load_report=load_report)
        self.image_root = str(image_root)
        self.per_caption = per_caption
        # Item -> (image row, caption index); int32 arrays stay small for COCO's 566k training pairs and are
        # shared, not copied, by forked DataLoader workers.
        counts = np.fromiter((len(c) for c in rows["captions"]), dtype=np.int64, count=len(rows))
        if per_caption:
            self._image_row = np.repeat(np.arange(len(rows), dtype=np.int32), counts)
            starts = np.cumsum(counts) - counts
            self._caption_index = (np.arange(int(counts.sum())) - np.repeat(starts, counts)).astype(np.int32)
        else:
            self._image_row = np.arange(len(rows), dtype=np.int32)
            self._caption_index = np.zeros(len(rows), dtype=np.int32)

    @property
    def num_images(self) -> int:
        return len(self.rows)

    def __len__(self) -> int:
        return len(self._image_row)

    def row_of(self, index: int) -> int:
        return int(self._image_row[index])

    def _record_id(self, row: dict[str, Any]) -> str:
        return f"image_id={row['image_id']}"

    def _item(self, index: int, row: dict[str, Any], image: Image.Image) -> dict[str, Any]:
        captions = list(row["captions"])
        return {"image_id": row["image_id"], "image": image, "captions": captions,
                "target": captions[int(self._caption_index[index])]}

    def references(self) -> dict[str, list[str]]:
        """``{image_id: [reference captions]}`` for every image of the split (after dropping bad captions)."""
        return dict(zip(self.rows["image_id"], self.rows["captions"], strict=True))

    def to_coco_annotations(self) -> dict[str, Any]:
        """The references as a COCO captions annotation file (for ``ptscale score caption --ref``).

        Numeric image ids are written as integers, as in the official COCO files.
        """
        images, annotations = [], []
        for image_id, file_name, captions in zip(self.rows["image_id"], self.rows["file_name"],
                                                 self.rows["captions"], strict=True):
            coco_id: int | str = int(image_id) if image_id.isdigit() else image_id
            images.append({"id": coco_id, "file_name": file_name})
            for caption in captions:
                annotations.append({"image_id": coco_id, "caption": caption, "id": len(annotations) + 1})
        return {"info": {"description": f"references of {self.where}"}, "licenses": [], "type": "captions",
                "images": images, "annotations": annotations}


def load_karpathy(json_path: str | os.PathLike[str], image_root: str | os.PathLike[str], split: str, *,
                  on_bad_data: OnBadData = "error", train_one_per_caption: bool = True,
                  restval_as_train: bool = True) -> CaptionDataset:
    """Load one Karpathy split of COCO or Flickr30k.

    Images are found at ``image_root/filepath/filename`` (COCO) or ``image_root/filename`` (Flickr30k).
    Empty captions and records without captions are handled by ``on_bad_data`` now; unreadable images when
    they are decoded. Raises :class:`EmptySplitError` if no usable record is left.
    """
    on_bad_data = check_policy(on_bad_data)
    if split not in KARPATHY_SPLITS:
        raise ValueError(f"split must be one of {KARPATHY_SPLITS}, got {split!r}")
    json_path = Path(json_path)
    records = _read_records(json_path)
    wanted = set(TRAIN_SPLITS) if split == "train" and restval_as_train else {split}
    selected = [r for r in records if isinstance(r, dict) and r.get("split") in wanted]
    where = f"split {split!r} of {json_path}"
    report = BadDataReport()
    columns: dict[str, list[Any]] = {name: [] for name in FEATURES}
    seen: set[str] = set()
    for position, record in enumerate(selected):
        parsed = _parse_record(record, position, json_path, Path(image_root), where, on_bad_data, report)
        if parsed is None:
            continue
        if parsed["image_id"] in seen:
            raise MalformedDataError(f"image id {parsed['image_id']} appears twice in {where}; the file is not a "
                             "Karpathy split file")
        seen.add(parsed["image_id"])
        for name in FEATURES:
            columns[name].append(parsed[name])
    report.kept = len(columns["image_id"])
    if report.kept == 0:
        present = sorted({str(r.get("split")) for r in records if isinstance(r, dict)})
        otherwise = f"no record has split {sorted(wanted)} (splits present: {present})"
        raise EmptySplitError(split, json_path, empty_split_detail(len(selected), report, otherwise))
    if report.skipped:
        logger.warning("%s: %s", where, report.summary("captions/records"))
    rows = datasets.Dataset.from_dict(columns, features=FEATURES)
    per_caption = train_one_per_caption and split in TRAIN_SPLITS
    return CaptionDataset(rows, split=split, source=json_path, image_root=image_root,
                          on_bad_data=on_bad_data, load_report=report, per_caption=per_caption)


def _read_records(json_path: Path) -> list[Any]:
    data = read_json_file(json_path, 'a Karpathy split file ({"images": [...]})')
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise MalformedDataError(f"{json_path} is not a Karpathy split file: expected {{\"images\": [...]}}")
    return data["images"]


def _parse_record(record: dict[str, Any], position: int, json_path: Path, image_root: Path, where: str,
                  on_bad_data: OnBadData, report: BadDataReport) -> dict[str, Any] | None:
    """One image record -> row columns, or None if the record is dropped (skip mode)."""
    filename = record.get("filename")
    sentences = record.get("sentences")
    if not isinstance(filename, str) or not filename or not isinstance(sentences, list):
        record_id = f"#{position} (imgid={record.get('imgid')})"
        reject(BadRecord(json_path, record_id, "malformed_record", 'needs "filename" and a "sentences" list',
                         where), on_bad_data, report)
        return None
    image_id = str(record["cocoid"]) if "cocoid" in record else Path(filename).stem
    record_id = f"image_id={image_id}"
    captions = _captions(sentences, filename, record_id, json_path, where, on_bad_data, report)
    if not captions:
        reject(BadRecord(json_path, record_id, "no_captions", filename, where), on_bad_data, report)
        return None
    folder = record.get("filepath") or ""
    return {"image_id": image_id, "file_name": filename, "image_path": str(image_root / folder / filename),
            "captions": captions}


def _captions(sentences: list[Any], filename: str, record_id: str, json_path: Path, where: str,
              on_bad_data: OnBadData, report: BadDataReport) -> list[str]:
    """The non-empty raw captions, stripped; each empty one goes through the policy."""
    captions = []
    for k, sentence in enumerate(sentences):
        raw = sentence.get("raw") if isinstance(sentence, dict) else None
        if isinstance(raw, str) and raw.strip():
            captions.append(raw.strip())
            continue
        sentid = sentence.get("sentid") if isinstance(sentence, dict) else None
        detail = f"sentence {k}" + (f", sentid {sentid}" if sentid is not None else "") + f" of {filename}"
        reject(BadRecord(json_path, record_id, "empty_caption", detail, where), on_bad_data, report)
    return captions
