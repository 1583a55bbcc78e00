"""Scoring an evaluation suite (the synthetic task's test, generalisation and retention groups): one set of
metrics per group, the attribute accuracy beside them, VQA through the official accuracy."""

from __future__ import annotations

import pytest

from ptscale.config import RunConfig, load_recipe
from ptscale.eval.evaluate import load_eval_data, score
from ptscale.eval.generate import record_key


class NoPixels:  # scoring needs no images; no tokenizer: no vocabulary check (tests/data/test_vocabulary.py)
    tokenizer = None

    def preprocess(self, records):
        return records


def _data(cfg: RunConfig, size: int = 6):
    return load_eval_data(cfg, NoPixels(), size=size)


@pytest.mark.slow  # three METEOR (java) runs: ~20 s or more on a busy 2-core machine
def test_each_group_is_scored_under_its_own_names_with_attribute_accuracy() -> None:
    data = _data(RunConfig())
    preds = {}
    for r in data.records:
        # test and retention: the first reference; generalisation: a caption naming a colour no scene of it has
        # (gen scenes are narrow-sized, so "purple" may be right; "bar" and "purple" both wrong is rarer)
        preds[record_key(r)] = r["captions"][0] if r["group"] != "gen" else "one object with a bar in purple"
    scored = score(preds, data, spice="off")
    metrics = scored.fields["metrics"]
    assert metrics["AttrAcc"] == 1.0 and metrics["ret/AttrAcc"] == 1.0
    gen_scenes = [r["scene"] for r in data.records if r["group"] == "gen"]
    right = sum(all(o.shape == "bar" or o.color == "purple" for o in s) and {o.shape for o in s} == {"bar"}
                and {o.color for o in s} == {"purple"} for s in gen_scenes)
    assert metrics["gen/AttrAcc"] == pytest.approx(right / len(gen_scenes))
    assert metrics["CIDEr"] > metrics["gen/CIDEr"] and metrics["ret/CIDEr"] > metrics["gen/CIDEr"]
    assert {"Bleu_4", "gen/Bleu_4", "ret/Bleu_4"} <= set(metrics)
    assert "SPICE" in scored.fields["unavailable"] and "gen/SPICE" in scored.fields["unavailable"]
    assert set(scored.fields["groups"]) == {"test", "gen", "ret"} and scored.fields["n_images"] == 6
    assert {row["group"] for row in scored.rows} == {"test", "gen", "ret"} and len(scored.rows) == 18


def test_synthetic_vqa_is_scored_with_the_official_accuracy_per_group() -> None:
    data = _data(load_recipe(None, ["data.task=vqa"]))
    assert data.task == "vqa"
    preds = {record_key(r): (r["target"] if r["group"] == "test" else "zebra") for r in data.records}
    metrics = score(preds, data).fields["metrics"]
    assert metrics["VQA_accuracy"] == 100.0  # ten identical human answers: an exact answer scores 1
    assert metrics["gen/VQA_accuracy"] == 0.0 and metrics["ret/VQA_accuracy"] == 0.0
    assert metrics["AttrAcc"] == 1.0 and metrics["ret/AttrAcc"] == 1.0  # "zebra" names no attribute


def test_the_train_split_of_synthetic_vqa_scores_against_its_own_answers() -> None:
    data = load_eval_data(load_recipe(None, ["data.task=vqa"]), NoPixels(), split="train", size=8)
    preds = {record_key(r): r["target"] for r in data.records}
    assert score(preds, data).fields["metrics"]["VQA_accuracy"] == 100.0
