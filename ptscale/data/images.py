"""Decode one image file completely, turning every way it can fail into a :class:`BadRecord`.

``Image.open`` only reads the header, so a truncated or corrupt file would otherwise fail later, inside the
image processor, with a PIL message that names neither the file nor the record. Decoding here
(``img.load()``) makes the failure happen where the file and record are known.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import datasets
import torch
from PIL import Image, ImageFile, UnidentifiedImageError
from torch.utils.data import Dataset

from ptscale.data.bad_data import (
    BadDataError,
    BadDataReport,
    BadRecord,
    OnBadData,
    SkippedRecord,
    check_policy,
)


def _check_truncation_policy() -> None:
    # With LOAD_TRUNCATED_IMAGES, PIL pads a truncated JPEG with grey and reports success, so a half-written
    # file would silently train the model on grey pixels. Some libraries set it at import time.
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by some imported code), so truncated images "
            "would decode silently as grey; set it back to False before loading data")


def load_image(path: str | os.PathLike[str], record_id: str = "?") -> Image.Image:
    """Open ``path``, decode all of it and return an RGB image.

    Raises :class:`BadRecord` (reason ``missing_image``, ``unreadable_image``, ``corrupt_image`` or
    ``truncated_image``) naming the file and ``record_id``. EXIF orientation is not applied, as in LAVIS.
    """
    _check_truncation_policy()
    path = Path(path)
    if not path.exists():
        raise BadRecord(path, record_id, "missing_image")
    if not path.is_file():
        raise BadRecord(path, record_id, "unreadable_image", "not a regular file")
    try:
        img = Image.open(path)
    except UnidentifiedImageError:
        raise BadRecord(path, record_id, "corrupt_image", "not a recognised image format") from None
    except PermissionError as err:
        raise BadRecord(path, record_id, "unreadable_image", err.strerror or "permission denied") from None
    except Exception as err:  # PIL raises many types for broken headers (SyntaxError, ValueError, ...)
        raise BadRecord(path, record_id, "corrupt_image", _error_text(err)) from None
    with img:
        try:
            img.load()
        except Exception as err:
            reason = "truncated_image" if "truncated" in str(err).lower() else "corrupt_image"
            raise BadRecord(path, record_id, reason, _error_text(err)) from None
        return img.convert("RGB")


def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


class LazyImageDataset(Dataset, ABC):
    """Map-style dataset over a ``datasets.Dataset`` of records holding image *paths*.

    Images are decoded in ``__getitem__`` (in the DataLoader worker). A bad image raises
    :class:`BadDataError` in error mode and returns a falsy :class:`SkippedRecord` in skip mode, for
    :func:`~ptscale.data.bad_data.collate_skipping` to drop and count. Subclasses say which record an item
    belongs to and how an item is built.
    """

    def __init__(self, rows: datasets.Dataset, *, split: str, source: str | os.PathLike[str],
                 on_bad_data: OnBadData, load_report: BadDataReport) -> None:
        self.rows = rows
        self.split = split
        self.source = str(source)
        self.on_bad_data = check_policy(on_bad_data)
        # Text-level problems found when the split was loaded (image problems are counted per epoch).
        self.load_report = load_report

    @property
    def where(self) -> str:
        return f"split {self.split!r} of {self.source}"

    def __len__(self) -> int:
        return len(self.rows)

    def row_of(self, index: int) -> int:
        """The row of ``rows`` that item ``index`` comes from (several items may share one image row)."""
        return index

    @abstractmethod
    def _record_id(self, row: dict[str, Any]) -> str:
        """How messages name the record of ``row`` (e.g. ``image_id=391895``)."""

    @abstractmethod
    def _item(self, index: int, row: dict[str, Any], image: Image.Image) -> dict[str, Any]:
        """The item for ``index`` from its row and decoded image."""

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedRecord:
        index = int(index)  # samplers may hand out numpy or tensor integers
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples of {self.where}")
        row = self.rows[self.row_of(index)]
        try:
            image = load_image(row["image_path"], self._record_id(row))
        except BadRecord as err:
            located = err.located(self.where)
            if self.on_bad_data == "error":
                # BadDataError (one string argument) survives the DataLoader's worker re-raise intact.
                raise BadDataError.of(located) from None
            return SkippedRecord.from_error(located)
        return self._item(index, row, image)


class ImageRecords:
    """What every image-text collator does with a batch's records: their text's token ids (no special tokens)
    and their processed pixels. Needs ``image_processor`` and ``tokenizer`` attributes."""

    image_processor: Any
    tokenizer: Any

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def pixels(self, records: list[dict]) -> torch.Tensor:
        """Processed images; records may carry ``pixel_values`` already (processed once, reused)."""
        if all("pixel_values" in r for r in records):
            return torch.stack([r["pixel_values"] for r in records])
        return self.image_processor([r["image"] for r in records], return_tensors="pt")["pixel_values"]

    def preprocess(self, records: list[dict]) -> list[dict]:
        """Attach ``pixel_values`` to every record (for datasets small enough to hold in memory)."""
        pixels = self.image_processor([r["image"] for r in records], return_tensors="pt")["pixel_values"]
        return [{**r, "pixel_values": px} for r, px in zip(records, pixels, strict=True)]


def empty_split_detail(selected: int, load_report: BadDataReport, otherwise: str) -> str:
    """Why a split came out empty: every record was dropped as bad, or there was nothing to begin with."""
    if selected and load_report.skipped:
        return f"all {selected} records were dropped as bad; {load_report.summary()}"
    return otherwise
