"""Offline evaluation: COCO caption metrics, VQAv2 accuracy, and the ``ptscale score`` command."""

from ptscale.eval.captioning import CaptionScores, ptb_tokenize, score_captions
from ptscale.eval.vqa import (
    VQAQuestion,
    VQAScores,
    load_ground_truth,
    normalize_answer,
    predictions_from_results,
    question_accuracy,
    topk_vqa_accuracy,
    vqa_accuracy,
)

__all__ = [
    "CaptionScores",
    "VQAQuestion",
    "VQAScores",
    "load_ground_truth",
    "normalize_answer",
    "predictions_from_results",
    "ptb_tokenize",
    "question_accuracy",
    "score_captions",
    "topk_vqa_accuracy",
    "vqa_accuracy",
]
