"""Official VQA accuracy: normalisation, leave-one-out, both all-identical rules, aggregation, top-k."""

from __future__ import annotations

import random

import pytest

from ptscale.eval.vqa import (
    VQAQuestion,
    load_ground_truth,
    normalize_answer,
    predictions_from_results,
    process_digit_article,
    process_punctuation,
    question_accuracy,
    topk_vqa_accuracy,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Yes.", "yes"),
        ("Two", "2"),
        ("none", "0"),
        ("The Ten Commandments", "10 commandments"),
        ("a dog", "dog"),
        ("an apple", "apple"),
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("Im", "im"),  # the table's "Im" key is capitalised and never matches after lower-casing
        ("1,000", "1000"),  # digit group: punctuation removed, not spaced
        ("3.5", "3.5"),  # a period before a digit stays
        ("t-shirt", "t shirt"),  # punctuation not touching a space becomes a space
        ("black - white", "black white"),  # touching a space: removed
        ("red,white", "red white"),
        ("what's up?", "what's up"),
        ("  left\tside\n", "left side"),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_normalisation_steps_separately() -> None:
    assert process_punctuation("yes!") == "yes "
    assert process_punctuation("dog.") == "dog"
    assert process_digit_article("A Three") == "3"


@pytest.mark.parametrize(
    ("n_matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]
)
def test_leave_one_out_accuracy(n_matches: int, expected: float) -> None:
    # With m matches among 10: a held-out match leaves m-1, a held-out miss leaves m; each min(1, ./3).
    answers = ["cat"] * n_matches + [f"other{i}" for i in range(10 - n_matches)]
    assert question_accuracy("cat", answers) == pytest.approx(expected)
    assert question_accuracy("cat", answers, official_2021=True) == pytest.approx(expected)


def test_all_identical_rule_default_normalises_prediction() -> None:
    assert question_accuracy("Yes", ["yes"] * 10) == 1.0
    assert question_accuracy("yes.", ["yes"] * 10) == 1.0


def test_all_identical_rule_official_2021_compares_raw() -> None:
    assert question_accuracy("Yes", ["yes"] * 10, official_2021=True) == 0.0
    assert question_accuracy(" yes\n", ["yes"] * 10, official_2021=True) == 1.0  # whitespace is still cleaned
    # As soon as the annotators disagree both sides are normalised, in both rules.
    mixed = ["yes"] * 9 + ["no"]
    assert question_accuracy("Yes", mixed, official_2021=True) == 1.0
    assert question_accuracy("Yes", mixed) == 1.0


def test_rules_differ_on_ground_truth_normalisation() -> None:
    # 2021 fully normalises disagreeing human answers ("two" -> "2"); the LAVIS rule only strips punctuation.
    answers = ["two"] * 2 + ["2"] * 2 + [f"x{i}" for i in range(6)]
    assert question_accuracy("2", answers, official_2021=True) == pytest.approx(1.0)
    assert question_accuracy("2", answers) == pytest.approx(0.6)


# Literal transcriptions of the two official evaluate() loops (dict-equality leave-one-out), used as oracles.
def _official_lavis(pred: str, answers: list[dict]) -> float:
    res = normalize_answer(pred)
    gts = [dict(a) for a in answers]
    if len({a["answer"] for a in gts}) > 1:
        for a in gts:
            a["answer"] = process_punctuation(a["answer"])
    accs = []
    for held in gts:
        others = [a for a in gts if a != held]
        accs.append(min(1, len([a for a in others if a["answer"] == res]) / 3))
    return sum(accs) / len(accs)


def _official_2021(pred: str, answers: list[dict]) -> float:
    gts = [dict(a, answer=a["answer"].replace("\n", " ").replace("\t", " ").strip()) for a in answers]
    res = pred.replace("\n", " ").replace("\t", " ").strip()
    if len({a["answer"] for a in gts}) > 1:
        for a in gts:
            a["answer"] = process_digit_article(process_punctuation(a["answer"]))
        res = process_digit_article(process_punctuation(res))
    accs = []
    for held in gts:
        others = [a for a in gts if a != held]
        accs.append(min(1, len([a for a in others if a["answer"] == res]) / 3))
    return sum(accs) / len(accs)


def test_matches_official_loops_on_random_questions() -> None:
    vocab = ["yes", "Yes", "no", "2", "two", "a dog", "dog", "dog.", "t-shirt", "t shirt", "red", "Red!"]
    rng = random.Random(0)
    for _ in range(500):
        raw = [rng.choice(vocab[: rng.randint(1, len(vocab))]) for _ in range(10)]
        answers = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(raw)]
        pred = rng.choice(vocab)
        assert question_accuracy(pred, raw) == pytest.approx(_official_lavis(pred, answers))
        assert question_accuracy(pred, raw, official_2021=True) == pytest.approx(
            _official_2021(pred, answers)
        )


def _gt() -> dict[int, VQAQuestion]:
    return {
        1: VQAQuestion(1, 10, ("yes",) * 10, "yes/no", "is the"),
        2: VQAQuestion(2, 10, ("2",) * 3 + ("3",) * 7, "number", "how many"),
        3: VQAQuestion(3, 11, ("red",) * 2 + ("blue",) * 8, "other", "what color"),
        4: VQAQuestion(4, 11, ("no",) * 10, "yes/no", "is the"),
    }


def test_aggregation_overall_and_per_type() -> None:
    scores = vqa_accuracy({1: "Yes", 2: "two", 3: "red", 4: "yes"}, _gt())
    assert scores.per_question == pytest.approx({1: 100.0, 2: 90.0, 3: 60.0, 4: 0.0})
    assert scores.overall == pytest.approx(62.5)
    assert scores.per_answer_type == pytest.approx({"number": 90.0, "other": 60.0, "yes/no": 50.0})
    assert scores.per_question_type == pytest.approx({"how many": 90.0, "is the": 50.0, "what color": 60.0})
    assert scores.n_questions == 4 and scores.n_unanswered == 0 and scores.k == 1
    # The 2021 rule only changes question 1 (unanimous "yes", raw "Yes").
    assert vqa_accuracy({1: "Yes", 2: "two", 3: "red", 4: "yes"}, _gt(), official_2021=True).overall == 37.5


def test_partial_predictions_and_require_all() -> None:
    scores = vqa_accuracy({1: "yes"}, _gt())
    assert scores.n_questions == 1 and scores.n_unanswered == 3 and scores.overall == 100.0
    with pytest.raises(ValueError, match="3 annotated question"):
        vqa_accuracy({1: "yes"}, _gt(), require_all=True)


def test_unknown_question_ids_are_named() -> None:
    expected = r"2 predicted question id\(s\) are not in the annotations: \[7, 8\]$"
    with pytest.raises(ValueError, match=expected):
        vqa_accuracy({1: "yes", 7: "no", 8: "no"}, _gt())


def test_too_few_human_answers() -> None:
    with pytest.raises(ValueError, match="at least 2 human answers"):
        question_accuracy("yes", ["yes"])


def test_topk_takes_best_of_first_k() -> None:
    ranked = {1: ["no", "maybe", "yes"], 3: ["green", "red", "blue"]}
    top = {k: topk_vqa_accuracy(ranked, _gt(), k=k) for k in (1, 2, 3, 5)}
    assert top[1].per_question == {1: 0.0, 3: 0.0}
    assert top[2].per_question == pytest.approx({1: 0.0, 3: 60.0})
    assert top[3].per_question == pytest.approx({1: 100.0, 3: 100.0})
    assert top[5].overall == pytest.approx(100.0) and top[5].k == 5
    assert top[5].notes == ["2 question(s) had fewer than k=5 candidates"]
    assert top[1].overall == vqa_accuracy({1: "no", 3: "green"}, _gt()).overall
    with pytest.raises(ValueError, match="k must be"):
        topk_vqa_accuracy(ranked, _gt(), k=0)


def _official_json() -> tuple[dict, dict]:
    annotations = {"annotations": [
        {"question_id": 5, "image_id": 9, "question_type": "what is", "answer_type": "other",
         "multiple_choice_answer": "cat",
         "answers": [{"answer": "cat", "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)]},
    ]}
    questions = {"questions": [{"question_id": 5, "image_id": 9, "question": "What is this?"}]}
    return annotations, questions


def test_load_ground_truth_from_official_json() -> None:
    annotations, questions = _official_json()
    gt = load_ground_truth(annotations, questions)
    assert gt[5] == VQAQuestion(5, 9, ("cat",) * 10, "other", "what is", "What is this?")


def test_load_ground_truth_errors() -> None:
    annotations, questions = _official_json()
    annotations["annotations"][0]["answers"] = []
    with pytest.raises(ValueError, match="question id 5 has no human answers"):
        load_ground_truth(annotations, questions)
    annotations, questions = _official_json()
    questions["questions"][0]["image_id"] = 8
    with pytest.raises(ValueError, match="question id 5: image id 9 in annotations but 8 in questions"):
        load_ground_truth(annotations, questions)
    annotations, _ = _official_json()
    with pytest.raises(ValueError, match="missing from the questions JSON"):
        load_ground_truth(annotations, {"questions": []})


def test_predictions_from_results() -> None:
    assert predictions_from_results([{"question_id": 5, "answer": "cat"}]) == {5: "cat"}
    with pytest.raises(ValueError, match="more than one prediction"):
        predictions_from_results([{"question_id": 5, "answer": "cat"}, {"question_id": 5, "answer": "dog"}])
    with pytest.raises(ValueError, match="no string 'answer'"):
        predictions_from_results([{"question_id": 5}])
