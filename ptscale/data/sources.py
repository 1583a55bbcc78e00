"""The train and eval data a recipe names: the synthetic task, COCO / Flickr30k (Karpathy) or VQAv2.

Synthetic splits are small and rendered into memory; real datasets stay lazy (images decoded per item).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch.utils.data import Subset

from ptscale.config import DataConfig
from ptscale.data.collate import CaptionCollator
from ptscale.data.synthetic import KIND, make_eval_suite, make_split
from ptscale.data.vocabulary import check_vocabulary
from ptscale.errors import read_json_file

VQA_PROMPT = "Question: {} Answer:"


@dataclass
class Splits:
    task: Literal["caption", "vqa", "text"]
    train: Sequence[dict]
    eval: Sequence[dict]
    references: dict[str, list[str]] | None = None  # captioning: image_id -> references
    vqa_annotations: dict[str, Any] | None = None  # VQA: the official annotations + questions JSON
    vqa_questions: dict[str, Any] | None = None


def _cap(dataset, n: int):
    return dataset if n <= 0 or n >= len(dataset) else Subset(dataset, range(n))


def load_splits(cfg: DataConfig, collator: CaptionCollator) -> Splits:
    """The recipe's splits, after checking that the collator's tokenizer can express their text
    (RecipeError naming the unknown-token rate otherwise)."""
    # text records are checked as they load (ptscale.data.text); the unknown-token check reads captions / answers
    if cfg.name == "text":
        from ptscale.data.text import load_text_split

        train, _ = load_text_split(cfg, collator, "train")
        evals, _ = load_text_split(cfg, collator, "eval")
        return Splits("text", train, evals)
    if cfg.name == "synthetic-text":
        from ptscale.data.synthetic_text import make_text_split
        from ptscale.data.text import check_records

        return Splits("text", *(check_records(cfg, collator, make_text_split(cfg.task, size, cfg.seed, split), split)
                                for split, size in (("train", cfg.train_size), ("eval", cfg.eval_size))))
    splits = _load(cfg, collator)
    if hasattr(collator, "check_regions") and splits.task == "caption" and cfg.name != "synthetic":
        collator.check_regions([i for split in (splits.train, splits.eval) for i in _image_ids(split)])  # VinVL
    check_vocabulary(cfg.name, collator.tokenizer, {"training": splits.train, "eval": splits.eval})
    return splits


def _image_ids(split) -> list[str]:
    """The image ids of a lazy split's items (a data set, or the Subset of its first N), without decoding images."""
    if isinstance(split, Subset):
        dataset = split.dataset
        return [str(dataset.rows[dataset.row_of(i)]["image_id"]) for i in split.indices]
    return [str(i) for i in split.rows["image_id"]]


def _load(cfg: DataConfig, collator: CaptionCollator) -> Splits:
    if cfg.name == "synthetic":
        return synthetic_splits(cfg, collator)
    if cfg.name in ("coco", "flickr30k"):
        from ptscale.data.captions import load_karpathy

        train = load_karpathy(cfg.karpathy_json, cfg.image_root, cfg.train_split, on_bad_data=cfg.on_bad_data)
        evals = load_karpathy(cfg.karpathy_json, cfg.image_root, cfg.eval_split, on_bad_data=cfg.on_bad_data)
        refs = evals.references()
        evals = _cap(evals, cfg.eval_size)
        if isinstance(evals, Subset):  # eval items are one per image, in row order
            kept = set(evals.dataset.rows.select(range(len(evals)))["image_id"])
            refs = {k: v for k, v in refs.items() if k in kept}
        return Splits("caption", _cap(train, cfg.train_size), evals, references=refs)
    from ptscale.data.vqa import load_vqav2

    prompt = cfg.prompt or VQA_PROMPT
    train = load_vqav2(cfg.vqa_train_questions, cfg.vqa_train_annotations, cfg.image_root,
                       on_bad_data=cfg.on_bad_data, prompt=prompt)
    evals = load_vqav2(cfg.vqa_eval_questions, cfg.vqa_eval_annotations, cfg.image_root,
                       on_bad_data=cfg.on_bad_data, prompt=prompt)
    return Splits("vqa", _cap(train, cfg.train_size), _cap(evals, cfg.eval_size),
                  vqa_annotations=read_json_file(cfg.vqa_eval_annotations, "official VQA annotations"),
                  vqa_questions=read_json_file(cfg.vqa_eval_questions, "official VQA questions"))


def synthetic_splits(cfg: DataConfig, collator: CaptionCollator) -> Splits:
    """The synthetic task's training split and its evaluation suite (test, generalisation and retention
    groups of ``data.eval_size`` each; ``ptscale.data.synthetic``). A recipe's ``data.prompt`` replaces the
    records' own task prompts (a VQA prompt keeps its ``{}`` for the question)."""
    train = make_split(cfg.task, cfg.train_size, cfg.seed, "train")
    evals = make_eval_suite(cfg.task, cfg.eval_size, cfg.seed)
    if cfg.prompt:
        for r in train + evals:
            r["prompt"] = cfg.prompt.format(r["question"]) if "question" in r else cfg.prompt
    if not getattr(collator, "per_record_prompt", True):  # BLIP captioning: one prompt per batch (data.prompt)
        for r in train + evals:
            if "captions" in r:
                del r["prompt"]
    train, evals = collator.preprocess(train), collator.preprocess(evals)
    if KIND[cfg.task] == "caption":
        return Splits("caption", train, evals, references={r["image_id"]: r["captions"] for r in evals})
    return Splits("vqa", train, evals, vqa_annotations=synthetic_vqa_annotations(evals),
                  vqa_questions={"questions": [{"question_id": r["question_id"], "image_id": i,
                                                "question": r["question"]} for i, r in enumerate(evals)]})


def synthetic_vqa_annotations(records: Sequence[dict]) -> dict[str, Any]:
    """The official annotations format for synthetic questions: ten identical human answers each (one true
    answer, as if every annotator agreed), so the official accuracy is 1 for it and 0 otherwise."""
    return {"annotations": [
        {"question_id": r["question_id"], "image_id": i, "question_type": r["question_type"],
         "answer_type": r["answer_type"], "multiple_choice_answer": r["target"],
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(r["answers"])]}
        for i, r in enumerate(records)]}
