"""A model holds exactly what its plan names: no prefix module for a plan without a prefix stage, and before
the first prefix stage of any plan the model computes what the pre-trained base computes, exactly (the
same operations on the same inputs in one process: deterministic by construction; LoRA B and adapter
up-projections start at zero, so they add exact zeros)."""

import copy

import pytest
import torch

from ptscale.config import load_recipe
from ptscale.models.backbone import Backbone
from ptscale.models.build import build_model, check_buildable
from ptscale.models.groups import group_sizes
from ptscale.plans import prefixes_active

ADAPTER = "adapter={kind: sequential, components: [qformer], bottleneck: 4}"
PLANS = [  # (plan, extra overrides)
    ("prefix", []), ("lora", []), ("adapter", [ADAPTER]), ("full", []),
    ("prefix->lora", []), ("prefix->adapter", [ADAPTER]), ("prefix->full", []), ("prefix+lora", []),
    ("lora->prefix", []), ("adapter->prefix", [ADAPTER]), ("full->prefix", []),
    ("alternate(prefix,lora,2)", []), ("alternate(lora,prefix,2)", []),
]


def _batch(tokenizer, processor, queries: int):
    from ptscale.data.collate import CaptionCollator
    from ptscale.data.synthetic import make_split

    records = make_split("downstream", 4, 0, "eval")
    collator = CaptionCollator(processor, tokenizer, queries, tokenizer.convert_tokens_to_ids("<image>"))
    return collator.train_batch(collator.preprocess(records))


@pytest.mark.parametrize("plan, extra", PLANS)
def test_before_the_first_prefix_stage_the_model_is_the_base(tiny_backbone, plan, extra):
    model, tokenizer, processor = tiny_backbone
    base = copy.deepcopy(model)
    cfg = load_recipe(overrides=[f"plan={plan}", *extra])
    wrapped = build_model(cfg, Backbone(model, tokenizer, processor, None), quiet=True).eval()
    batch = _batch(tokenizer, processor, model.config.num_query_tokens)
    with torch.no_grad():
        expected = base(**batch).logits
        first_prefix = next((i for i, s in enumerate(cfg.stages) if "prefix" in s.train), len(cfg.stages))
        for index in range(-1, first_prefix):  # -1: the evaluation before training
            wrapped.dormant = not prefixes_active(cfg.stages, index)
            assert torch.equal(wrapped(**batch).logits, expected), f"{plan}: stage {index} is not the base"
        if first_prefix < len(cfg.stages):
            wrapped.dormant = not prefixes_active(cfg.stages, first_prefix)
            assert not wrapped.dormant
            assert not torch.equal(wrapped(**batch).logits, expected)  # the prefixes act from their stage on
    if not any("prefix" in s.train for s in cfg.stages):
        assert len(wrapped.prefixes) == 0 and group_sizes(wrapped)["prefix"] == 0, f"{plan} holds prefixes"


def test_a_plan_without_prefix_drops_the_default_lengths_and_refuses_explicit_ones():
    from ptscale.config import RecipeError

    assert load_recipe(overrides=["plan=lora"]).prefix.lengths == {}
    with pytest.raises(RecipeError, match=r"prefix.lengths.qformer: set, but plan lora trains no prefix"):
        load_recipe(overrides=["plan=lora", "prefix.lengths.qformer=4"])


def test_check_buildable_names_a_missing_target(tiny_backbone):
    from ptscale.config import RecipeError
    from ptscale.models.backbone import BackboneSource

    model, tokenizer, processor = tiny_backbone
    source = BackboneSource(None, model.config, tokenizer, processor, {"source": "test", "digest": ""})
    check_buildable(load_recipe(), source)  # the default fits
    cfg = load_recipe(overrides=["lora.targets={qformer: [attention.attention.nope]}"])
    with pytest.raises(RecipeError, match=r"lora.targets.qformer: 'attention.attention.nope' matches no Linear"):
        check_buildable(cfg, source)
    cfg = load_recipe(overrides=["prefix.lengths.encoder=4"])  # a T5 target on an OPT language model
    with pytest.raises(RecipeError, match=r"prefix.lengths"):
        check_buildable(cfg, source)
