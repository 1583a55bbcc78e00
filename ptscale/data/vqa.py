"""VQAv2 from the official question and annotation files, with the COCO images.

Questions: ``{"questions": [{"image_id", "question", "question_id"}], "data_subtype": "val2014", ...}``;
annotations: ``{"annotations": [{"question_id", "image_id", "question_type", "answer_type",
"answers": [{"answer", "answer_confidence", "answer_id"} x 10], "multiple_choice_answer"}]}``.
Without annotations (the test splits) the dataset is for inference only: items have no answers.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
from PIL import Image

from ptscale.data.bad_data import BadDataReport, BadRecord, EmptySplitError, OnBadData, check_policy, reject
from ptscale.data.images import LazyImageDataset, empty_split_detail
from ptscale.errors import MalformedDataError, read_json_file

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "Question: {} Answer:"
# Fields: image_root, data_subtype (as in the questions file), image_subtype (the image folder), image_id.
DEFAULT_IMAGE_FORMAT = "{image_root}/{image_subtype}/COCO_{image_subtype}_{image_id:012d}.jpg"
# test-dev questions are a subset of the test images: their file says test-dev2015, the images are test2015.
IMAGE_SUBTYPES = {"test-dev2015": "test2015"}

FEATURES = datasets.Features({
    "question_id": datasets.Value("int64"),
    "image_id": datasets.Value("string"),
    "image_path": datasets.Value("string"),
    "question": datasets.Value("string"),
    "answers": datasets.List(datasets.Value("string")),
    "target": datasets.Value("string"),
    "answer_type": datasets.Value("string"),
    "question_type": datasets.Value("string"),
})


class VQADataset(LazyImageDataset):
    """Items ``{"question_id", "image_id", "image", "question", "prompt", "answers", "target",
    "answer_type", "question_type"}``; without annotations ``answers`` is empty and the rest None."""

    def __init__(self, rows: datasets.Dataset, *, split: str, source: str | os.PathLike[str],
                 on_bad_data: OnBadData, load_report: BadDataReport, prompt: str, has_answers: bool) -> None:
        super().__init__(rows, split=split, source=source, on_bad_data=on_bad_data, load_report=load_report)
        self.prompt = prompt
        self.has_answers = has_answers

    def _record_id(self, row: dict[str, Any]) -> str:
        return f"question_id={row['question_id']} image_id={row['image_id']}"

    def _item(self, index: int, row: dict[str, Any], image: Image.Image) -> dict[str, Any]:
        return {"question_id": row["question_id"], "image_id": row["image_id"], "image": image,
                "question": row["question"], "prompt": self.prompt.format(row["question"]),
                "answers": list(row["answers"]), "target": row["target"], "answer_type": row["answer_type"],
                "question_type": row["question_type"]}


def most_frequent_answer(answers: list[str], multiple_choice_answer: str | None) -> str:
    """The most frequent human answer; ties go to the official ``multiple_choice_answer``, then to the
    answer given first."""
    counts = Counter(answers)
    top = max(counts.values())
    tied = [a for a in counts if counts[a] == top]  # Counter keeps first-seen order
    return multiple_choice_answer if multiple_choice_answer in tied else tied[0]


def load_vqav2(questions_json: str | os.PathLike[str], annotations_json: str | os.PathLike[str] | None,
               image_root: str | os.PathLike[str], *, on_bad_data: OnBadData = "error",
               prompt: str = DEFAULT_PROMPT, image_format: str = DEFAULT_IMAGE_FORMAT,
               data_subtype: str | None = None) -> VQADataset:
    """Load a VQAv2 split. ``data_subtype`` overrides the questions file's (it names the split and, by
    default, the image folder). Empty questions and questions without answers are handled by
    ``on_bad_data`` now; unreadable images when they are decoded. Raises :class:`EmptySplitError` if no
    usable question is left."""
    on_bad_data = check_policy(on_bad_data)
    if "{}" not in prompt:
        raise ValueError(f"prompt must contain '{{}}' where the question goes, got {prompt!r}")
    questions_json = Path(questions_json)
    q_data = _read_json(questions_json, "questions")
    subtype = data_subtype or q_data.get("data_subtype")
    if not isinstance(subtype, str) or not subtype:
        raise ValueError(f"{questions_json} has no 'data_subtype'; pass data_subtype= (e.g. 'val2014')")
    annotations_json = None if annotations_json is None else Path(annotations_json)
    annotations = None if annotations_json is None else _index_annotations(annotations_json)
    where = f"split {subtype!r} of {questions_json}"
    report = BadDataReport()
    columns: dict[str, list[Any]] = {name: [] for name in FEATURES}
    seen: set[int] = set()
    for position, question in enumerate(q_data["questions"]):
        row = _parse_question(question, position, annotations, questions_json, annotations_json, where,
                              on_bad_data, report)
        if row is None:
            continue
        if row["question_id"] in seen:
            raise MalformedDataError(f"question id {row['question_id']} appears twice in {questions_json}")
        seen.add(row["question_id"])
        row["image_path"] = _image_path(image_format, image_root, subtype, int(row["image_id"]))
        for name in FEATURES:
            columns[name].append(row[name])
    report.kept = len(columns["question_id"])
    if report.kept == 0:
        detail = empty_split_detail(len(q_data["questions"]), report, "the questions file has no questions")
        raise EmptySplitError(subtype, questions_json, detail)
    if report.skipped:
        logger.warning("%s: %s", where, report.summary("questions"))
    rows = datasets.Dataset.from_dict(columns, features=FEATURES)
    return VQADataset(rows, split=subtype, source=questions_json, on_bad_data=on_bad_data, load_report=report,
                      prompt=prompt, has_answers=annotations is not None)


def _read_json(path: Path, key: str) -> dict[str, Any]:
    data = read_json_file(path, f"an official VQA {key} file ({{{key!r}: [...]}})")
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise MalformedDataError(f"{path} is not an official VQA {key} file: expected {{{key!r}: [...]}}")
    return data


def _index_annotations(path: Path) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for position, ann in enumerate(_read_json(path, "annotations")["annotations"]):
        if not isinstance(ann, dict) or "question_id" not in ann:
            raise MalformedDataError(f"{path}: annotation #{position} has no \"question_id\"; expected official "
                                     "VQAv2 annotations")
        qid = int(ann["question_id"])
        if qid in out:
            raise MalformedDataError(f"question id {qid} is annotated twice in {path}")
        out[qid] = ann
    return out


def _image_path(image_format: str, image_root: str | os.PathLike[str], subtype: str, image_id: int) -> str:
    return image_format.format(image_root=str(image_root).rstrip("/"), data_subtype=subtype,
                               image_subtype=IMAGE_SUBTYPES.get(subtype, subtype), image_id=image_id)


def _parse_question(question: Any, position: int, annotations: dict[int, dict[str, Any]] | None,
                    questions_json: Path, annotations_json: Path | None, where: str,
                    on_bad_data: OnBadData, report: BadDataReport) -> dict[str, Any] | None:
    """One question (and its annotation) -> row columns without the image path; None if dropped."""
    if not isinstance(question, dict) or not {"question_id", "image_id", "question"} <= question.keys():
        reject(BadRecord(questions_json, f"#{position}", "malformed_record",
                         'needs "question_id", "image_id" and "question"', where), on_bad_data, report)
        return None
    qid, image_id = int(question["question_id"]), int(question["image_id"])
    record_id = f"question_id={qid} image_id={image_id}"
    text = question["question"]
    if not isinstance(text, str) or not text.strip():
        reject(BadRecord(questions_json, record_id, "empty_question", "", where), on_bad_data, report)
        return None
    row: dict[str, Any] = {"question_id": qid, "image_id": str(image_id), "question": text.strip(),
                           "answers": [], "target": None, "answer_type": None, "question_type": None}
    if annotations is None or annotations_json is None:
        return row
    return _with_answers(row, annotations.get(qid), annotations_json, record_id, where, on_bad_data, report)


def _with_answers(row: dict[str, Any], ann: dict[str, Any] | None, annotations_json: Path, record_id: str,
                  where: str, on_bad_data: OnBadData, report: BadDataReport) -> dict[str, Any] | None:
    if ann is None:
        reject(BadRecord(annotations_json, record_id, "no_answers", "no annotation for this question", where),
               on_bad_data, report)
        return None
    if int(ann.get("image_id", -1)) != int(row["image_id"]):
        reject(BadRecord(annotations_json, record_id, "malformed_record",
                         f"annotated with image_id {ann.get('image_id')}", where), on_bad_data, report)
        return None
    # The human answers as given (the official scorer normalises them); blank ones cannot be targets.
    entries = ann.get("answers") or []
    answers = [a["answer"] for a in entries if isinstance(a, dict) and isinstance(a.get("answer"), str)]
    usable = [a for a in answers if a.strip()]
    if not usable:
        reject(BadRecord(annotations_json, record_id, "no_answers", "", where), on_bad_data, report)
        return None
    row.update(answers=answers, target=most_frequent_answer(usable, ann.get("multiple_choice_answer")),
               answer_type=ann.get("answer_type"), question_type=ann.get("question_type"))
    return row
