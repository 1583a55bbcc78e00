"""The text default's tasks: deterministic, the downstream operation absent from pre-training."""

from ptscale.data.synthetic_text import DOWNSTREAM_OPS, PRETRAIN_OPS, make_text_split, vocabulary


def test_splits_are_deterministic_and_distinct():
    assert make_text_split("downstream", 20, 1, "train") == make_text_split("downstream", 20, 1, "train")
    assert make_text_split("downstream", 20, 1, "train") != make_text_split("downstream", 20, 1, "eval")


def test_downstream_is_an_operation_pretraining_never_shows():
    pre = make_text_split("pretrain", 500, 0, "train")
    down = make_text_split("downstream", 50, 0, "train")
    assert {r["text"].split()[0] for r in pre} == set(PRETRAIN_OPS)
    assert {r["prompt"].split()[0] for r in down} == set(DOWNSTREAM_OPS) == {"rotate"}
    r = down[0]
    items = r["prompt"].split()[1:-1]
    assert r["completion"].split() == items[1:] + items[:1]
    words = set(vocabulary())
    assert all(set(x["text"].split()) <= words for x in pre)
