"""VQAv2 accuracy as computed by the official evaluation code (GT-Vision-Lab/VQA, ``vqaEval.py``).

Per question: the prediction (and the human answers) are normalised; for each of the n human answers
(10 in VQAv2) the other n-1 are taken and the prediction scores ``min(1, #matches / 3)``; the question's
accuracy is the mean of those n numbers. Overall, per-answer-type and per-question-type accuracies are means
over questions, x100 (the official code rounds them to 2 decimals; these are left unrounded).

Which answers are normalised is where versions differ (``official_2021``):

* ``official_2021=False`` (default): the prediction is always normalised (punctuation, then number words,
  articles and contractions); the human answers get the punctuation step only, and only when they are not
  all identical. This is GT-Vision-Lab's code before 2021 and the copy LAVIS ships
  (``lavis/common/vqa_tools/vqa_eval.py``), which produced the BLIP-2 numbers this project compares with,
  so results are directly comparable. It also makes "Yes" match ten "yes": the normalisation that is
  applied whenever the annotators disagree is not withheld just because they agree.
* ``official_2021=True``: GT-Vision-Lab's current code. Human answers and prediction are stripped; only when
  the human answers are not all identical are both fully normalised; otherwise the raw strings are compared,
  so "Yes" scores 0 against ten "yes".

VQAv2's human answers are already lower-case with digits, so the two rules differ only on predictions
that need normalisation for questions with unanimous annotators; both are tested.

The leave-one-out is by position ("the other n-1 answers"); the official code drops answer dicts equal to
the held-out one, which is the same thing when answer ids are distinct, as they are in VQAv2.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

# ---- Normalisation tables, verbatim from vqaEval.py (GT-Vision-Lab/VQA, also LAVIS) ----------------------

CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)
# Official regex kept as is: "(?!<=\d)" is a (mistyped) negative lookahead, not a lookbehind, so in effect
# a period is removed unless a digit follows ("2.5" keeps its point, "dog." loses it). The official call
# passes re.UNICODE (32) where `count` goes, so at most 32 periods are removed; kept for exact parity.
_PERIOD_STRIP_MAX = 32
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    """vqaEval.processPunctuation: drop a punctuation mark if it touches a space (or the text has a digit
    group like "1,000"), else replace it by a space; then remove periods not followed by a digit."""
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_MAX)


def process_digit_article(text: str) -> str:
    """vqaEval.processDigitArticle: lower-case, number words -> digits, drop articles, fix contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """Full normalisation applied to a prediction: whitespace, punctuation, digits/articles/contractions."""
    return process_digit_article(process_punctuation(_clean_whitespace(text)))


def question_accuracy(prediction: str, human_answers: Sequence[str], *, official_2021: bool = False) -> float:
    """Accuracy of one prediction in [0, 1]: mean over held-out human answers of min(1, matches / 3)."""
    if len(human_answers) < 2:
        raise ValueError(f"VQA accuracy needs at least 2 human answers (leave-one-out), "
                         f"got {len(human_answers)}")
    if official_2021:
        answers = [_clean_whitespace(a) for a in human_answers]
        pred = _clean_whitespace(prediction)
        if len(set(answers)) > 1:
            answers = [process_digit_article(process_punctuation(a)) for a in answers]
            pred = process_digit_article(process_punctuation(pred))
    else:
        pred = normalize_answer(prediction)
        # The raw set decides, before any processing, as in the official code.
        answers = [process_punctuation(a) for a in human_answers] if len(set(human_answers)) > 1 \
            else list(human_answers)
    hits = [a == pred for a in answers]
    total = sum(hits)
    # Holding out answer j leaves (total - hits[j]) matches among the other n-1.
    return sum(min(1.0, (total - h) / 3.0) for h in hits) / len(hits)


# ---- Ground truth -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VQAQuestion:
    question_id: int
    image_id: int
    answers: tuple[str, ...]
    answer_type: str
    question_type: str
    question: str | None = None


def load_ground_truth(annotations: Mapping[str, Any], questions: Mapping[str, Any] | None = None
                      ) -> dict[int, VQAQuestion]:
    """Index official VQA annotation JSON (and, optionally, the questions JSON) by question id.

    With ``questions``, every annotated question must appear there with the same image id (a mismatch
    means the two files are from different splits).
    """
    if "annotations" not in annotations:
        raise ValueError("annotations JSON has no 'annotations' list")
    texts: dict[int, Mapping[str, Any]] = {}
    if questions is not None:
        if "questions" not in questions:
            raise ValueError("questions JSON has no 'questions' list")
        texts = {int(q["question_id"]): q for q in questions["questions"]}
    out: dict[int, VQAQuestion] = {}
    for ann in annotations["annotations"]:
        qid = int(ann["question_id"])
        if qid in out:
            raise ValueError(f"question id {qid} is annotated twice")
        answers = tuple(a["answer"] for a in ann.get("answers") or ())
        if not answers:
            raise ValueError(f"question id {qid} has no human answers")
        text = None
        if questions is not None:
            if qid not in texts:
                raise ValueError(f"question id {qid} is annotated but missing from the questions JSON")
            if int(texts[qid]["image_id"]) != int(ann["image_id"]):
                raise ValueError(f"question id {qid}: image id {ann['image_id']} in annotations but "
                                 f"{texts[qid]['image_id']} in questions")
            text = texts[qid].get("question")
        out[qid] = VQAQuestion(qid, int(ann["image_id"]), answers, str(ann["answer_type"]),
                               str(ann["question_type"]), text)
    return out


# ---- Scoring ----------------------------------------------------------------------------------------------


@dataclass
class VQAScores:
    """Accuracies in percent. ``k`` is 1 for ordinary accuracy and the k of top-k accuracy otherwise."""

    overall: float
    per_answer_type: dict[str, float]
    per_question_type: dict[str, float]
    per_question: dict[int, float]
    n_questions: int
    # Annotated questions without a prediction; they are not scored (see ``require_all``).
    n_unanswered: int
    k: int = 1
    official_2021: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def predictions_from_results(results: Iterable[Mapping[str, Any]]) -> dict[int, str]:
    """Official results format ``[{"question_id": int, "answer": str}]`` -> {question_id: answer}."""
    out: dict[int, str] = {}
    for r in results:
        if not isinstance(r, Mapping) or "question_id" not in r:
            raise ValueError(f'VQA result entries need "question_id" and "answer", got {r!r}')
        qid = int(r["question_id"])
        if qid in out:
            raise ValueError(f"question id {qid} has more than one prediction")
        if not isinstance(r.get("answer"), str):
            raise ValueError(f"prediction for question id {qid} has no string 'answer'")
        out[qid] = r["answer"]
    return out


def vqa_accuracy(
    predictions: Mapping[int, str],
    ground_truth: Mapping[int, VQAQuestion],
    *,
    official_2021: bool = False,
    require_all: bool = False,
) -> VQAScores:
    """Official VQA accuracy of one answer per question (see the module docstring for ``official_2021``).

    Only predicted questions are scored; ``require_all=True`` makes unanswered annotated questions an error
    (the official ``loadRes`` demands the full set).
    """
    return topk_vqa_accuracy({q: [a] for q, a in predictions.items()}, ground_truth, k=1,
                             official_2021=official_2021, require_all=require_all)


def topk_vqa_accuracy(
    ranked_predictions: Mapping[int, Sequence[str]],
    ground_truth: Mapping[int, VQAQuestion],
    *,
    k: int = 5,
    official_2021: bool = False,
    require_all: bool = False,
) -> VQAScores:
    """Top-k accuracy as in the PT-PEFT paper's "Top-5 answers": a question scores the best VQA accuracy
    among its first k ranked candidates (max over candidates, so k=1 is ordinary accuracy)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not ranked_predictions:
        raise ValueError("no predictions to score")
    unknown = [q for q in ranked_predictions if q not in ground_truth]
    if unknown:
        raise ValueError(f"{len(unknown)} predicted question id(s) are not in the annotations: "
                         f"{unknown[:10]}")
    unanswered = len(ground_truth) - len(ranked_predictions)
    if require_all and unanswered:
        missing = [q for q in ground_truth if q not in ranked_predictions][:10]
        raise ValueError(f"{unanswered} annotated question(s) have no prediction, e.g. {missing}")

    per_question: dict[int, float] = {}
    by_answer_type: dict[str, list[float]] = defaultdict(list)
    by_question_type: dict[str, list[float]] = defaultdict(list)
    for qid, candidates in ranked_predictions.items():
        if isinstance(candidates, str) or not candidates:
            raise ValueError(f"question id {qid}: expected a non-empty list of candidate answers")
        gt = ground_truth[qid]
        acc = max(question_accuracy(c, gt.answers, official_2021=official_2021) for c in candidates[:k])
        per_question[qid] = 100.0 * acc
        by_answer_type[gt.answer_type].append(100.0 * acc)
        by_question_type[gt.question_type].append(100.0 * acc)

    notes = []
    short = sum(1 for c in ranked_predictions.values() if len(c) < k)
    if k > 1 and short:
        notes.append(f"{short} question(s) had fewer than k={k} candidates")
    return VQAScores(
        overall=_mean(per_question.values()),
        per_answer_type={t: _mean(v) for t, v in sorted(by_answer_type.items())},
        per_question_type={t: _mean(v) for t, v in sorted(by_question_type.items())},
        per_question=per_question,
        n_questions=len(per_question),
        n_unanswered=unanswered,
        k=k,
        official_2021=official_2021,
        notes=notes,
    )


def _mean(values: Iterable[float]) -> float:
    vals = list(values)
    return sum(vals) / len(vals)
