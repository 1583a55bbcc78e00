"""Fixtures for the data loaders: official-format annotation files and real JPEGs in a tmp image root.

The images are the two real photographs of the shared clipscore example, copied under COCO/Flickr names;
bad images are made from them (first half of a JPEG) or from random bytes.
"""

from __future__ import annotations

import json
import random
import shutil
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

EXAMPLE_IMAGES = Path("/work/shared/testdata/clipscore_example/images")
IMAGE_KINDS = ("image1", "image2", "corrupt", "truncated", "missing")

# COCO Karpathy records: (cocoid, folder, split, number of captions, image kind).
COCO_RECORDS = [
    (391895, "val2014", "test", 5, "image1"),
    (522418, "val2014", "test", 3, "image2"),
    (184613, "train2014", "train", 5, "image1"),
    (318219, "train2014", "train", 4, "image2"),
    (554625, "val2014", "restval", 5, "image1"),
    (397133, "val2014", "val", 5, "image2"),
]
# Flickr30k Karpathy records: (file stem, split, image kind).
FLICKR_RECORDS = [
    ("1000092795", "train", "image1"),
    ("10002456", "train", "image2"),
    ("1007129816", "val", "image1"),
    ("1009434119", "test", "image2"),
]

MakeImage = Callable[[Path, str], Path]


def first_error(iterable: Iterable[Any]) -> Exception:
    """Iterate until something raises; return the exception with its traceback dropped.

    The traceback of an error re-raised from a DataLoader worker references the DataLoader iterator. Kept
    alive (as ``pytest.raises`` keeps it), the iterator is only freed by a later garbage-collection pass,
    where its worker shutdown waits out its 2 x 5 s join timeouts and stalls an unrelated test.
    """
    try:
        for _ in iterable:
            pass
    except Exception as err:
        err.__traceback__ = None
        return err
    raise AssertionError("iteration finished without an error")


@pytest.fixture(scope="session")
def example_images() -> dict[str, Path]:
    if not EXAMPLE_IMAGES.is_dir():
        pytest.fail(f"test images missing: {EXAMPLE_IMAGES} (shared/testdata must sit beside the checkout)")
    return {"image1": EXAMPLE_IMAGES / "image1.jpg", "image2": EXAMPLE_IMAGES / "image2.jpg"}


@pytest.fixture
def make_image(example_images: dict[str, Path]) -> MakeImage:
    """Put an image of ``kind`` at ``path``: a real JPEG, random bytes, half a JPEG, or nothing."""

    def make(path: Path, kind: str) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind in example_images:
            shutil.copyfile(example_images[kind], path)
        elif kind == "corrupt":
            rng = random.Random(0)
            path.write_bytes(b"garbage!" + bytes(rng.randrange(256) for _ in range(4096)))
        elif kind == "truncated":
            data = example_images["image1"].read_bytes()
            path.write_bytes(data[: len(data) // 2])
        elif kind != "missing":
            raise ValueError(f"unknown image kind {kind!r}")
        return path

    return make


def captions_for(image_id: str, n: int) -> list[str]:
    return [f"caption {k} of image {image_id}" for k in range(n)]


def karpathy_record(imgid: int, filename: str, split: str, captions: list[str], *,
                    filepath: str | None = None, cocoid: int | None = None) -> dict[str, Any]:
    """A record exactly as in dataset_coco.json / dataset_flickr30k.json."""
    sentids = [imgid * 10 + k for k in range(len(captions))]
    record: dict[str, Any] = {
        "filename": filename,
        "imgid": imgid,
        "sentences": [{"tokens": raw.lower().split(), "raw": raw, "imgid": imgid, "sentid": sid}
                      for raw, sid in zip(captions, sentids, strict=True)],
        "split": split,
        "sentids": sentids,
    }
    if filepath is not None:
        record = {"filepath": filepath, **record}
    if cocoid is not None:
        record["cocoid"] = cocoid
    return record


def coco_filename(folder: str, cocoid: int) -> str:
    return f"COCO_{folder}_{cocoid:012d}.jpg"


@pytest.fixture
def coco(tmp_path: Path, make_image: MakeImage) -> dict[str, Any]:
    """A dataset_coco.json with train/restval/val/test records, images under image_root/{train,val}2014.

    Returns the paths and the raw records; ``write(records)`` rewrites the JSON (for bad-data cases) and
    ``image(cocoid, kind)`` replaces one record's image.
    """
    root = tmp_path / "coco"
    records = []
    for imgid, (cocoid, folder, split, n, kind) in enumerate(COCO_RECORDS):
        filename = coco_filename(folder, cocoid)
        make_image(root / folder / filename, kind)
        records.append(karpathy_record(imgid, filename, split, captions_for(str(cocoid), n),
                                       filepath=folder, cocoid=cocoid))
    json_path = tmp_path / "dataset_coco.json"

    def write(recs: list[dict[str, Any]]) -> Path:
        json_path.write_text(json.dumps({"images": recs, "dataset": "coco"}))
        return json_path

    def image(cocoid: int, kind: str) -> Path:
        folder = next(f for c, f, *_ in COCO_RECORDS if c == cocoid)
        path = root / folder / coco_filename(folder, cocoid)
        path.unlink(missing_ok=True)
        return make_image(path, kind)

    write(records)
    return {"json": json_path, "root": root, "records": records, "write": write, "image": image}


@pytest.fixture
def flickr(tmp_path: Path, make_image: MakeImage) -> dict[str, Any]:
    """A dataset_flickr30k.json (no filepath, no cocoid) with all images in one folder."""
    root = tmp_path / "flickr30k-images"
    records = []
    for imgid, (stem, split, kind) in enumerate(FLICKR_RECORDS):
        make_image(root / f"{stem}.jpg", kind)
        records.append(karpathy_record(imgid, f"{stem}.jpg", split, captions_for(stem, 5)))
    json_path = tmp_path / "dataset_flickr30k.json"
    json_path.write_text(json.dumps({"images": records, "dataset": "flickr30k"}))
    return {"json": json_path, "root": root, "records": records}


def vqa_answers(*answers: str) -> list[dict[str, Any]]:
    return [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(answers)]


def vqa_annotation(question_id: int, image_id: int, answers: list[str], multiple_choice_answer: str,
                   answer_type: str = "other", question_type: str = "what") -> dict[str, Any]:
    return {"question_type": question_type, "multiple_choice_answer": multiple_choice_answer,
            "answers": vqa_answers(*answers), "image_id": image_id, "answer_type": answer_type,
            "question_id": question_id}


# VQAv2 val2014 questions on the two real images: (question_id, image_id, question, answers, mca, type).
VQA_QUESTIONS = [
    (3918950, 391895, "What is the man riding?", ["bike"] * 7 + ["bicycle"] * 3, "bike", "other"),
    (3918951, 391895, "Is it sunny?", ["yes"] * 10, "yes", "yes/no"),
    (5224180, 522418, "How many people are there?", ["2"] * 5 + ["two"] * 5, "two", "number"),
    (5224181, 522418, "What color is the shirt?", ["red"] * 4 + ["blue"] * 4 + ["green"] * 2, "green",
     "other"),
]


def vqa_image_path(root: Path, subtype: str, image_id: int) -> Path:
    return root / subtype / f"COCO_{subtype}_{image_id:012d}.jpg"


@pytest.fixture
def vqa(tmp_path: Path, make_image: MakeImage) -> dict[str, Any]:
    """Official-format VQAv2 val2014 questions + annotations and the COCO images they refer to.

    ``write(questions, annotations)`` rewrites both files (for bad-data cases).
    """
    root = tmp_path / "coco"
    make_image(vqa_image_path(root, "val2014", 391895), "image1")
    make_image(vqa_image_path(root, "val2014", 522418), "image2")
    questions = [{"image_id": img, "question": q, "question_id": qid} for qid, img, q, *_ in VQA_QUESTIONS]
    annotations = [vqa_annotation(qid, img, answers, mca, atype, " ".join(q.lower().split()[:2]))
                   for qid, img, q, answers, mca, atype in VQA_QUESTIONS]
    q_path = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    a_path = tmp_path / "v2_mscoco_val2014_annotations.json"

    def write(qs: list[dict[str, Any]], anns: list[dict[str, Any]]) -> tuple[Path, Path]:
        common = {"info": {"description": "fixture"}, "license": {"name": "fixture"}, "data_type": "mscoco",
                  "data_subtype": "val2014"}
        q_path.write_text(json.dumps({**common, "task_type": "Open-Ended", "questions": qs}))
        a_path.write_text(json.dumps({**common, "annotations": anns}))
        return q_path, a_path

    write(questions, annotations)
    return {"questions": q_path, "annotations": a_path, "root": root, "question_records": questions,
            "annotation_records": annotations, "write": write}


class WordTokenizer:
    """Just enough of a Hugging Face tokenizer for CaptionCollator: one id per word (a hash, so DataLoader
    workers agree on the ids)."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        assert not add_special_tokens
        return {"input_ids": [4 + zlib.crc32(w.encode()) % 1000 for w in text.split()]}


class TinyImageProcessor:
    """Just enough of an image processor for CaptionCollator: resize to 8x8 and stack as floats."""

    def __call__(self, images: list[Any], return_tensors: str = "pt") -> dict[str, Any]:
        import numpy as np
        import torch

        arrays = [np.asarray(img.convert("RGB").resize((8, 8)), dtype=np.float32) / 255.0 for img in images]
        return {"pixel_values": torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()}


@pytest.fixture
def caption_collator() -> Any:
    from ptscale.data.collate import CaptionCollator

    return CaptionCollator(TinyImageProcessor(), WordTokenizer(), num_query_tokens=2, image_token_id=3,
                           prompt="", max_text_len=16)
