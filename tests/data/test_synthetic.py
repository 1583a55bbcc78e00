"""The synthetic world: a narrow downstream training set, a generalisation split it never covers, the
pre-training distribution as the retention group, and the attribute accuracy of captions."""

from __future__ import annotations

from ptscale.data import synthetic as S
from ptscale.data.synthetic import Obj, attribute_accuracy, is_narrow, make_eval_suite, make_split, wrong_attributes


def _scenes(records: list[dict]) -> list[S.Scene]:
    return [r["scene"] for r in records]


def test_the_downstream_training_set_is_narrower_than_pre_training() -> None:
    train = make_split("downstream", 400, 0, "train")
    pretrain = S.pretraining_mixture(400, 0)
    assert all(is_narrow(s) for s in _scenes(train))
    assert {o.shape for s in _scenes(train) for o in s} == set(S.NARROW_SHAPES)
    assert {o.color for s in _scenes(train) for o in s} == set(S.NARROW_COLORS)
    assert max(len(s) for s in _scenes(train)) == S.MAX_OBJECTS["narrow"]
    # pre-training: every shape and colour, up to three objects, captions and questions with their own prompts
    assert {o.shape for s in _scenes(pretrain) for o in s} == set(S.SHAPES)
    assert {o.color for s in _scenes(pretrain) for o in s} == set(S.COLORS)
    assert max(len(s) for s in _scenes(pretrain)) == S.MAX_OBJECTS["broad"]
    assert {r["prompt"] for r in pretrain if "captions" in r} == {S.PRETRAIN_PROMPT}
    assert all(r["prompt"].startswith("Question:") for r in pretrain if "question" in r)
    assert {r["prompt"] for r in train} == {S.DOWNSTREAM_PROMPT}


def test_the_generalisation_split_needs_what_the_downstream_set_lacks() -> None:
    train = {s for s in _scenes(make_split("downstream", 400, 0, "train"))}
    suite = make_eval_suite("downstream", 50, 0)
    groups = {g: [r for r in suite if r["group"] == g] for g in S.EVAL_GROUPS}
    assert [len(groups[g]) for g in S.EVAL_GROUPS] == [50, 50, 50]
    gen = _scenes(groups["gen"])
    assert not any(is_narrow(s) for s in gen)  # each holds a shape or colour the training set never shows
    assert not train & set(gen)
    assert all(is_narrow(s) for s in _scenes(groups["test"]))
    # the generalisation group asks for the downstream style; the retention group for the pre-training one
    assert {r["prompt"] for r in groups["gen"]} == {S.DOWNSTREAM_PROMPT}
    assert {r["prompt"] for r in groups["ret"]} == {S.PRETRAIN_PROMPT}
    assert len({r["image_id"] for r in suite}) == len(suite)


def test_splits_are_deterministic_and_distinct() -> None:
    a, b = make_split("downstream", 20, 3, "train"), make_split("downstream", 20, 3, "train")
    assert [r["target"] for r in a] == [r["target"] for r in b] and [r["scene"] for r in a] == [r["scene"] for r in b]
    evals = make_split("downstream", 20, 3, "eval")
    assert [r["scene"] for r in a] != [r["scene"] for r in evals]


def test_vqa_suite_has_unique_question_ids_and_ten_identical_answers() -> None:
    suite = make_eval_suite("vqa", 30, 0)
    assert len({r["question_id"] for r in suite}) == 90
    assert all(r["answers"] == [r["target"]] * 10 for r in suite)
    narrow = [r for r in suite if r["group"] in ("test", "gen")]
    assert {r["question_type"] for r in narrow} <= set(S.QUESTION_KINDS["narrow"])
    assert {r["question_type"] for r in suite if r["group"] == "ret"} > set(S.QUESTION_KINDS["narrow"])


def test_every_word_is_in_the_vocabulary() -> None:
    words = set(S.vocabulary())
    records = S.pretraining_mixture(300, 1) + make_eval_suite("downstream", 50, 1) + make_eval_suite("vqa", 50, 1)
    for r in records:
        texts = [r["prompt"], *r.get("captions", []), *r.get("answers", [])]
        assert set(" ".join(texts).split()) <= words, texts


SCENE = (Obj("circle", "red", "small", (0, 0)), Obj("square", "blue", "large", (1, 1)))


def test_attribute_accuracy_on_hand_made_captions() -> None:
    right = "two objects with a circle in red small at the top left and a square in blue large at the center"
    assert wrong_attributes(right, SCENE) == []
    assert wrong_attributes("a large red triangle on the bottom", SCENE) == ["triangle", "bottom"]
    assert wrong_attributes("a green circle", SCENE) == ["green"]
    assert wrong_attributes("there are two shapes", SCENE) == []  # naming nothing is not naming something wrong
    captions = {"a": right, "b": "a yellow circle", "c": "the red circle is above the blue square",
                "d": "a small circle on the right"}
    assert attribute_accuracy(captions, dict.fromkeys(captions, SCENE)) == 0.5  # b: yellow; d: right
