"""``ptscale score caption|vqa``: score saved predictions offline with the official metrics.

    ptscale score caption --pred P.json --ref R.json [--out OUT.json] [--spice auto|require|off]
    ptscale score vqa --pred P.json --questions Q.json --annotations A.json [--out OUT.json]
                      [--official-2021] [--top-k K] [--require-all]

Caption predictions are COCO results (``[{"image_id", "caption"}]``); references are a COCO captions
annotation file (``{"images": [...], "annotations": [{"image_id", "caption", "id"}]}``) or a plain
``{image_id: [captions]}`` dict. Image ids are compared as strings, so ``391895`` and ``"391895"`` match.
VQA predictions are official results (``[{"question_id", "answer"}]``); with ``--top-k K`` each entry also
needs a ranked ``"answers"`` list. Exit status: 0 scored, 1 bad input or evaluation failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ptscale.eval.captioning import SPICE_CHOICES, CaptionScores, score_captions
from ptscale.eval.vqa import (
    VQAScores,
    load_ground_truth,
    predictions_from_results,
    topk_vqa_accuracy,
    vqa_accuracy,
)


def add_score_subparser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Register ``score`` (with ``caption`` and ``vqa``) on a parent's ``add_subparsers()`` object."""
    score = subparsers.add_parser("score", help="score saved predictions (COCO captions, VQAv2)")
    add_score_args(score)
    return score


def add_score_args(score: argparse.ArgumentParser) -> None:
    """``caption`` and ``vqa`` below ``score``."""
    kinds = score.add_subparsers(dest="score_task", required=True)

    cap = kinds.add_parser("caption", help="BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE if available)")
    cap.add_argument("--pred", type=Path, required=True, help='COCO results JSON [{"image_id", "caption"}]')
    cap.add_argument("--ref", type=Path, required=True,
                     help="COCO captions annotation JSON, or {image_id: [captions]}")
    cap.add_argument("--out", type=Path, help="write metrics and per-image scores here (JSON)")
    cap.add_argument("--spice", choices=SPICE_CHOICES, default="auto",
                     help="auto: SPICE if its jars are present and it runs (default)")

    vqa = kinds.add_parser("vqa", help="official VQAv2 accuracy, overall and per answer/question type")
    vqa.add_argument("--pred", type=Path, required=True, help='results JSON [{"question_id", "answer"}]')
    vqa.add_argument("--questions", type=Path, required=True, help="official questions JSON")
    vqa.add_argument("--annotations", type=Path, required=True, help="official annotations JSON")
    vqa.add_argument("--out", type=Path, help="write accuracies and per-question scores here (JSON)")
    vqa.add_argument("--official-2021", action="store_true",
                     help="compare raw strings when all human answers are identical (GT-Vision-Lab, 2021)")
    vqa.add_argument("--top-k", type=int, default=None,
                     help='also report top-k accuracy from each entry\'s ranked "answers" list')
    vqa.add_argument("--require-all", action="store_true",
                     help="fail if an annotated question has no prediction")


def run_score(args: argparse.Namespace) -> int:
    try:
        if args.score_task == "caption":
            return _run_caption(args)
        if args.score_task == "vqa":
            return _run_vqa(args)
    except (ValueError, KeyError, TypeError, OSError) as err:
        # One line a user can act on instead of a traceback: the input files are missing, malformed or disagree
        # (exit 3, a data error, as everywhere in ptscale)
        what = f"missing key {err}" if isinstance(err, KeyError) else str(err)
        print(f"ptscale score {args.score_task}: data error: {what}", file=sys.stderr)
        return 3
    except RuntimeError as err:  # the scorer itself failed (e.g. no java for SPICE when required)
        print(f"ptscale score {args.score_task}: error: {err}", file=sys.stderr)
        return 1
    raise ValueError(f"unknown score task {args.score_task!r}")


# ---- caption ----------------------------------------------------------------------------------------------


def _load_json(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def caption_predictions(data: Any) -> dict[str, str]:
    """COCO results list -> {image_id (str): caption}; duplicate image ids are an error."""
    if not isinstance(data, list):
        raise ValueError('caption predictions must be a list of {"image_id", "caption"} objects')
    out: dict[str, str] = {}
    for entry in data:
        if not isinstance(entry, Mapping) or "image_id" not in entry or "caption" not in entry:
            raise ValueError(f'caption prediction entries need "image_id" and "caption", got {entry!r}')
        image_id = str(entry["image_id"])
        if image_id in out:
            raise ValueError(f"image id {image_id} has more than one predicted caption")
        out[image_id] = entry["caption"]
    return out


def caption_references(data: Any) -> dict[str, list[str]]:
    """COCO captions annotations, or a plain {image_id: [captions]} dict -> {image_id (str): captions}."""
    if isinstance(data, Mapping) and "annotations" in data:
        refs: dict[str, list[str]] = {}
        for ann in data["annotations"]:
            if not isinstance(ann, Mapping) or "image_id" not in ann or "caption" not in ann:
                raise ValueError(f'caption annotations need "image_id" and "caption", got {ann!r}')
            refs.setdefault(str(ann["image_id"]), []).append(ann["caption"])
        return refs
    if isinstance(data, Mapping) and all(
        isinstance(v, list) and all(isinstance(c, str) for c in v) for v in data.values()
    ):
        return {str(k): list(v) for k, v in data.items()}
    raise ValueError('references must be COCO captions annotations {"annotations": [...]} '
                     "or a {image_id: [captions]} dict")


def _run_caption(args: argparse.Namespace) -> int:
    predictions = caption_predictions(_load_json(args.pred))
    references = caption_references(_load_json(args.ref))
    scores = score_captions(predictions, references, spice=args.spice)
    print(format_caption_table(scores))
    if args.out is not None:
        _write_json(args.out, {"task": "caption", "pred": str(args.pred), "ref": str(args.ref),
                               **scores.to_dict()})
    return 0


def format_caption_table(scores: CaptionScores) -> str:
    lines = [f"images: {scores.n_images}"]
    lines += [f"{name:<8} {value:.4f}" for name, value in scores.metrics.items()]
    lines += [f"{name:<8} unavailable: {why}" for name, why in scores.unavailable.items()]
    if scores.empty_predictions:
        lines.append(f"empty predictions (scored 0): {len(scores.empty_predictions)}")
    lines += [f"warning: {w}" for w in scores.warnings]
    return "\n".join(lines)


# ---- vqa --------------------------------------------------------------------------------------------------


def _run_vqa(args: argparse.Namespace) -> int:
    results = _load_json(args.pred)
    if not isinstance(results, list):
        raise ValueError('VQA predictions must be a list of {"question_id", "answer"} objects')
    ground_truth = load_ground_truth(_load_json(args.annotations), _load_json(args.questions))
    top1 = _top1_answers(results)
    scores = vqa_accuracy(top1, ground_truth, official_2021=args.official_2021, require_all=args.require_all)
    report: dict[str, Any] = {"task": "vqa", "pred": str(args.pred), "annotations": str(args.annotations),
                              "questions": str(args.questions), "accuracy": scores.to_dict()}
    print(format_vqa_table(scores))
    if args.top_k is not None:
        ranked = _ranked_answers(results)
        topk = topk_vqa_accuracy(ranked, ground_truth, k=args.top_k, official_2021=args.official_2021,
                                 require_all=args.require_all)
        report["topk_accuracy"] = topk.to_dict()
        print(format_vqa_table(topk))
    if args.out is not None:
        _write_json(args.out, report)
    return 0


def _top1_answers(results: list[Mapping[str, Any]]) -> dict[int, str]:
    # Entries that carry only a ranked list are scored on their first candidate.
    with_answer = [r if "answer" in r else {**r, "answer": _first(r)} for r in results]
    return predictions_from_results(with_answer)


def _first(entry: Mapping[str, Any]) -> str:
    answers = entry.get("answers")
    if not isinstance(answers, list) or not answers:
        raise ValueError(f"question id {entry.get('question_id')}: no 'answer' and no ranked 'answers'")
    return answers[0]


def _ranked_answers(results: list[Mapping[str, Any]]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for r in results:
        answers = r.get("answers")
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"--top-k needs a ranked 'answers' list of strings; question id "
                             f"{r.get('question_id')} has {answers!r}")
        out[int(r["question_id"])] = answers
    return out


def format_vqa_table(scores: VQAScores) -> str:
    label = "accuracy" if scores.k == 1 else f"top-{scores.k} accuracy"
    rule = "official-2021" if scores.official_2021 else "always-normalise"
    header = f"{label} ({rule}), {scores.n_questions} questions"
    if scores.n_unanswered:
        header += f", {scores.n_unanswered} annotated questions without prediction"
    lines = [header, f"  {'overall':<16} {scores.overall:6.2f}"]
    lines += [f"  {t:<16} {v:6.2f}" for t, v in scores.per_answer_type.items()]
    lines += [f"  note: {n}" for n in scores.notes]
    return "\n".join(lines)


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    print(f"wrote {path}")
