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
from ptscale.eval.generate import generate_captions

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


def score(preds: dict[str, Any], data: EvalData, spice: str = "auto") -> Scored:
    if data.task == "text":
        from ptscale.eval.text import score_text

        metrics, rows = score_text(preds, data.records)
        return Scored({"metrics": metrics, "unavailable": {}, "n_records": len(rows)}, rows)
    return score_vqa(preds, data) if data.task == "vqa" else score_captions_task(preds, data, spice)


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
