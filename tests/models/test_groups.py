import pytest

from ptscale.config import LoraConfig, PrefixConfig
from ptscale.models.groups import GROUPS, check_stage_changes, group_of, group_sizes, set_trainable
from ptscale.prefix.model import PrefixTunedModel
from ptscale.tuners.lora import inject_lora, lora_target_modules

QKV = ["attention.attention.query", "attention.attention.key", "attention.attention.value"]


@pytest.fixture
def wrapped(tiny_backbone):
    base, _, _ = tiny_backbone
    model = PrefixTunedModel(base, PrefixConfig(lengths={"qformer": 4, "language_model": 4}, encoder_hidden=8))
    inject_lora(model, LoraConfig(targets={"qformer": QKV}))
    return model


def test_every_parameter_has_exactly_one_group(wrapped):
    names = [n for n, _ in wrapped.named_parameters()]
    groups = {n: group_of(n) for n in names}
    # OPT ties lm_head to embed_tokens: the shared weight is listed once, under embeddings; text_encoder and
    # text_decoder are BLIP's towers (tests/models/test_blip.py), bert is VinVL's (tests/models/test_vinvl.py)
    assert set(groups.values()) == set(GROUPS) - {"lm_head", "adapter", "text_encoder", "text_decoder", "bert"}
    assert all(groups[n] == "lora" for n in names if ".lora_" in n)
    assert groups["base.query_tokens"] == "qformer"
    assert groups["base.language_model.model.decoder.embed_tokens.weight"] == "embeddings"
    assert sum(group_sizes(wrapped).values()) == sum(p.numel() for p in wrapped.parameters())


def test_lora_targets_self_attention_only(tiny_backbone):
    base, _, _ = tiny_backbone
    wrapped = PrefixTunedModel(base, PrefixConfig(lengths={"qformer": 0, "language_model": 0}))
    targets = lora_target_modules(wrapped, LoraConfig(targets={"qformer": QKV}))
    assert targets and all("crossattention" not in t for t in targets)
    assert len(targets) == 3 * wrapped.base.config.qformer_config.num_hidden_layers
    with pytest.raises(ValueError, match="lora.targets.qformer: 'nonexistent' matches no Linear"):
        lora_target_modules(wrapped, LoraConfig(targets={"qformer": ["nonexistent"]}))


def test_set_trainable(wrapped):
    trainable, total = set_trainable(wrapped, ["prefix"])
    on = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert on and all(n.startswith("prefixes.") for n in on)
    assert trainable == sum(p.numel() for p in wrapped.parameters() if p.requires_grad) and total > trainable
    set_trainable(wrapped, ["prefix", "lora"])
    on = {group_of(n) for n, p in wrapped.named_parameters() if p.requires_grad}
    assert on == {"prefix", "lora"}


DIGESTS = {"prefixes.qformer.embedding": "a", "base.qformer.encoder.layer.0.w": "b", "base.vision_model.x": "c"}


def test_a_stage_changes_exactly_its_groups():
    after = {**DIGESTS, "prefixes.qformer.embedding": "a2"}
    check_stage_changes(DIGESTS, after, ["prefix"], "s")  # the trained group moved, nothing else
    with pytest.raises(RuntimeError, match=r"\[s\] frozen parameters changed: \['base.vision_model.x'\]"):
        check_stage_changes(DIGESTS, {**after, "base.vision_model.x": "c2"}, ["prefix"], "s")
    with pytest.raises(RuntimeError, match="group 'qformer' was set to train but no parameter of it changed"):
        check_stage_changes(DIGESTS, after, ["prefix", "qformer"], "s")
