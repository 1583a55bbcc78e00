"""One evaluation path: the split a run evaluates, generation gathered over ranks, and scoring (caption metrics
or VQA accuracy). The training recipe (before training and after each stage) and ``ptscale eval`` both call
these, so their numbers cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ptscale.config import DataConfig, EvalConfig, RunConfig
from ptscale.data.sources import Splits, load_splits
from ptscale.dist import DistInfo, gather_objects
from ptscale.eval.generate import generate_captions, record_key

PER_IMAGE_HEADLINE = ("Bleu_4", "CIDEr")

# What identifies the evaluated data, per source, beside name/split/size/prompt (enough to rebuild it).
_SOURCE_KEYS = {"synthetic": ("task", "seed"), "synthetic-text": ("task", "seed", "max_text_len"),
                "coco": ("karpathy_json", "image_root", "eval_split"),
                "flickr30k": ("karpathy_json", "image_root", "eval_split"),
                "vqav2": ("vqa_eval_questions", "vqa_eval_annotations", "image_root"),
                "text": ("eval_file", "train_file", "eval_split", "prompt_column", "completion_column", "text_column",
                         "chat_template", "max_text_len")}


@dataclass
class EvalData:
    task: str  # "caption", "vqa" or "text"
    records: Sequence[dict]  # a list, or a lazy dataset whose skipped (bad) items are falsy
    references: dict[str, list[str]] | None  # captioning: image_id -> references
    splits: Splits
    description: dict[str, Any]


def eval_data(data: DataConfig, splits: Splits, split: str = "eval") -> EvalData:
    """The ``split`` of already loaded splits, described (source, split, size, prompt, source keys)."""
    if split == "eval":
        records, references = splits.eval, splits.references
    elif splits.task == "vqa":  # the synthetic questions: their own answers are the annotations
        from ptscale.data.sources import synthetic_vqa_annotations

        records, references = splits.train, None
        splits = dataclasses.replace(splits, eval=splits.train, vqa_questions=None,
                                     vqa_annotations=synthetic_vqa_annotations(splits.train))
    else:
        records, references = splits.train, {r["image_id"]: r["captions"] for r in splits.train}
    description = {"source": data.name, "split": split, "size": len(records), "prompt": data.prompt,
                   **{k: getattr(data, k) for k in _SOURCE_KEYS.get(data.name, ())}}
    return EvalData(splits.task, records, references, splits, description)


def load_eval_data(cfg: RunConfig, collator, split: str = "eval", size: int | None = None) -> EvalData:
    """The run's ``split`` as its recipe defines it; ``size`` overrides the split's size (synthetic) or cap
    (real datasets: the first N). ``train`` is offered for the synthetic task only (its records carry their
    references; a real training split holds one item per caption)."""
    if split not in ("eval", "train"):
        raise ValueError(f"--split {split!r}: choose eval or train")
    data = cfg.data
    if split == "train" and data.name != "synthetic":
        raise ValueError(f"--split train: only for the synthetic task (data.name is {data.name!r})")
    if size is not None:
        if size < 1:
            raise ValueError(f"the number of samples must be >= 1, got {size}")
        data = dataclasses.replace(data, **{f"{split}_size": size})
    if split == "eval" and data.name == "synthetic":
        data = dataclasses.replace(data, train_size=1)  # load_splits renders both splits: skip unused images
    return eval_data(data, load_splits(data, collator), split)


def generate_gathered(model, collator, records: Sequence[dict], settings: EvalConfig, world: DistInfo, *,
                      synced: bool = False) -> dict[str, Any]:
    """key (image_id; question_id for VQA) -> generated text for every record, on every rank: each rank
    generates its shard (``synced``: under ZeRO-3, every rank makes the same generate calls), then all gather.
    Text (a language model's collator): record id -> its loss terms and generation (ptscale.eval.text)."""
    from ptscale.data.text_collate import TextCollator

    predict = generate_captions
    if isinstance(collator, TextCollator):
        from ptscale.eval.text import predict_text as predict
    mine = predict(model, collator, records, settings, rank=world.rank, world=world.world_size, synced=synced)
    merged: dict[str, Any] = {}
    for part in gather_objects(mine):
        merged.update(part)  # shard padding repeats records: the same id, the same text
    return merged


@dataclass
class Scored:
    """What a task's scorer hands back: the results-file fields (``metrics``, ``unavailable``, counts) and the
    per-item rows."""

    fields: dict[str, Any]
    rows: list[dict[str, Any]]


ATTRIBUTE_ACCURACY = "AttrAcc"  # share of outputs naming no wrong shape, colour, size or position (synthetic)
MAIN_GROUP = "test"  # an evaluation suite's group whose metrics keep their plain names
# Printed beside the headline metrics when an evaluation has them (the synthetic suite's other groups)
SUITE_HEADLINE = (ATTRIBUTE_ACCURACY, "gen/CIDEr", f"gen/{ATTRIBUTE_ACCURACY}", "gen/VQA_accuracy", "ret/CIDEr",
                  f"ret/{ATTRIBUTE_ACCURACY}", "ret/VQA_accuracy")


def score(preds: dict[str, Any], data: EvalData, spice: str = "auto") -> Scored:
    """Score the predictions; an evaluation suite (records with a ``group``: the synthetic task's test,
    generalisation and retention groups) is scored per group, the metrics of group G named ``G/<metric>``
    (the test group's keep their plain names). Records that carry their ``scene`` also get the attribute
    accuracy. Text records (a language model's) are scored by ``ptscale.eval.text``."""
    if data.task == "text":
        from ptscale.eval.text import score_text

        metrics, rows = score_text(preds, data.records)
        return Scored({"metrics": metrics, "unavailable": {}, "n_records": len(rows)}, rows)
    groups: dict[str, list[dict]] = {}
    for i in range(len(data.records)):
        record = data.records[i]
        if record:
            groups.setdefault(record.get("group", MAIN_GROUP), []).append(record)
    if len(groups) <= 1:
        return _score_group(preds, data, spice)
    fields: dict[str, Any] = {"metrics": {}, "unavailable": {}, "groups": {}}
    rows = []
    for group, records in groups.items():
        part = _score_group({k: preds[k] for k in map(record_key, records) if k in preds},
                            _group_data(data, records), spice)
        name = (lambda m: m) if group == MAIN_GROUP else (lambda m, g=group: f"{g}/{m}")
        fields["metrics"].update({name(m): v for m, v in part.fields["metrics"].items()})
        fields["unavailable"].update({name(m): v for m, v in part.fields["unavailable"].items()})
        fields["groups"][group] = {k: v for k, v in part.fields.items() if k not in ("metrics", "unavailable")}
        if group == MAIN_GROUP:
            fields.update({k: v for k, v in part.fields.items() if k not in ("metrics", "unavailable")})
        rows += [{**row, "group": group} for row in part.rows]
    return Scored(fields, rows)


def _group_data(data: EvalData, records: list[dict]) -> EvalData:
    """The part of ``data`` one group's records make up (its references or its VQA annotations)."""
    keys = {record_key(r) for r in records}
    refs = {k: v for k, v in data.references.items() if k in keys} if data.references is not None else None
    splits = data.splits
    if data.task == "vqa":
        annotations = {"annotations": [a for a in splits.vqa_annotations["annotations"]
                                       if str(a["question_id"]) in keys]}
        questions = None if splits.vqa_questions is None else {
            "questions": [q for q in splits.vqa_questions["questions"] if str(q["question_id"]) in keys]}
        splits = dataclasses.replace(splits, vqa_annotations=annotations, vqa_questions=questions)
    return EvalData(data.task, records, refs, splits, data.description)


def _score_group(preds: dict[str, str], data: EvalData, spice: str) -> Scored:
    scored = score_vqa(preds, data) if data.task == "vqa" else score_captions_task(preds, data, spice)
    scenes = {record_key(r): r["scene"] for r in data.records if r and "scene" in r}
    if scenes:
        from ptscale.data.synthetic import attribute_accuracy

        scored.fields["metrics"][ATTRIBUTE_ACCURACY] = attribute_accuracy(
            {k: v for k, v in preds.items() if k in scenes}, scenes)
    return scored


def score_captions_task(preds: dict[str, str], data: EvalData, spice: str) -> Scored:
    from ptscale.eval.captioning import score_captions

    refs = data.references or {}
    scores = score_captions(preds, refs, spice=spice)
    # References in data order: the order of the split, not of the ranks' shards.
    ids = [i for i in refs if i in preds]
    rows = [{"image_id": i, "caption": preds[i], "references": refs[i],
             **{m: scores.per_image[i][m] for m in PER_IMAGE_HEADLINE}, "scores": scores.per_image[i]} for i in ids]
    skipped = sorted(set(refs) - set(preds))  # bad images skipped by the data loader (on_bad_data=skip)
    fields = {"metrics": scores.metrics, "unavailable": scores.unavailable, "n_images": scores.n_images,
              "skipped": skipped, "empty_predictions": scores.empty_predictions, "warnings": scores.warnings}
    return Scored(fields, rows)


def score_vqa(preds: dict[str, str], data: EvalData) -> Scored:
    """The official VQAv2 accuracy (percent), overall and per answer type."""
    from ptscale.eval.vqa import load_ground_truth, vqa_accuracy

    truth = load_ground_truth(data.splits.vqa_annotations, data.splits.vqa_questions)
    answers = {int(k): v for k, v in preds.items()}
    scores = vqa_accuracy(answers, truth)
    metrics = {"VQA_accuracy": scores.overall, **{f"VQA_{t}": a for t, a in scores.per_answer_type.items()}}
    rows = [{"question_id": q, "answer": a, "accuracy": scores.per_question.get(q)} for q, a in sorted(answers.items())]
    fields = {"metrics": metrics, "unavailable": {}, "n_questions": scores.n_questions,
              "n_unanswered": scores.n_unanswered, "notes": scores.notes}
    return Scored(fields, rows)
