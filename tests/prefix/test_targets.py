"""The target registry: which attention modules take a prefix, the clear errors for those that cannot,
and the per-target parameter report."""

import inspect

import pytest
import torch
from transformers import (
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForQuestionAnswering,
    GPT2Config,
    GPT2LMHeadModel,
)
from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention
from transformers.models.t5.modeling_t5 import T5Attention

from ptscale.config import PREFIX_TARGETS, PrefixConfig
from ptscale.models.families import BY_MODEL_TYPE
from ptscale.prefix.attention import SLOT_ATTR
from ptscale.prefix.model import PrefixHookError, PrefixTunedModel, prefix_parameter_report
from ptscale.prefix.targets import FINDERS, WRAPPER, mechanism
from ptscale.prefix.wrapper import PrefixAttentionWrapper
from tests.prefix.families import LENGTHS, build


def _blip(cls):
    torch.manual_seed(0)
    cfg = BlipConfig(vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=16, patch_size=8),
                     text_config=dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, encoder_hidden_size=16, bos_token_id=2,
                                      sep_token_id=3, pad_token_id=0))
    return cls(cfg)


def test_t5_attention_dispatches_through_the_interface_and_takes_prefixes():
    # transformers 5.23: T5Attention calls ALL_ATTENTION_FUNCTIONS (with position_bias), so T5 is supported.
    assert "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(T5Attention.forward)
    model = PrefixTunedModel(build("t5"), PrefixConfig(lengths={"encoder": 2, "decoder": 3}, encoder_hidden=8))
    hooked = {n: getattr(m, SLOT_ATTR).target for n, m in model.base.named_modules() if hasattr(m, SLOT_ATTR)}
    assert hooked == {**{f"encoder.block.{i}.layer.0.SelfAttention": "encoder" for i in range(2)},
                      **{f"decoder.block.{i}.layer.0.SelfAttention": "decoder" for i in range(2)}}
    # the decoder's cross-attention (layer.1.EncDecAttention) gets no prefix
    assert not any(hasattr(b.layer[1].EncDecAttention, SLOT_ATTR) for b in model.base.decoder.block)


def test_self_attention_only_in_blip2():
    model = PrefixTunedModel(build("blip2-opt"), PrefixConfig(lengths=LENGTHS["blip2-opt"], encoder_hidden=8))
    hooked = [n for n, m in model.base.named_modules() if hasattr(m, SLOT_ATTR)]
    assert len(hooked) == 2 + 2 + 2  # vision, Q-Former self-attention, OPT
    assert not any("crossattention" in n for n in hooked)


@pytest.mark.parametrize("cls, target, module", [
    (BlipForConditionalGeneration, "decoder", "text_decoder.bert.encoder.layer.0.attention.self"),
    (BlipForConditionalGeneration, "language_model", "text_decoder.bert.encoder.layer.0.attention.self"),
    (BlipForQuestionAnswering, "encoder", "text_encoder.encoder.layer.0.attention.self"),
    (BlipForQuestionAnswering, "language_model", "text_encoder.encoder.layer.0.attention.self"),
    (BlipForQuestionAnswering, "decoder", "text_decoder.bert.encoder.layer.0.attention.self"),
    (BlipForConditionalGeneration, "vision", "vision_model.encoder.layers.0.self_attn"),
])
def test_blip_attention_takes_its_prefix_through_a_module_wrapper(cls, target, module):
    # transformers 5.23: BLIP's attention computes scores itself (no attention interface): the second mechanism.
    assert "ALL_ATTENTION_FUNCTIONS" not in inspect.getsource(BlipTextSelfAttention.forward)
    model = PrefixTunedModel(_blip(cls), PrefixConfig(lengths={target: 2}, encoder_hidden=8))
    wrapped = model.base.get_submodule(module)
    assert isinstance(wrapped, PrefixAttentionWrapper) and getattr(wrapped, SLOT_ATTR).target == target
    assert mechanism(module, _blip(cls).get_submodule(module)) == WRAPPER


def test_blip_captioning_has_no_text_encoder():
    with pytest.raises(PrefixHookError, match="BlipForConditionalGeneration has no text encoder"):
        PrefixTunedModel(_blip(BlipForConditionalGeneration), PrefixConfig(lengths={"encoder": 2}))


@pytest.mark.parametrize("family, lengths, message", [
    ("llama", {"qformer": 2}, "prefix target 'qformer' does not exist for llama"),
    ("blip2-opt", {"decoder": 2}, "decoder-only; use the target 'language_model'"),
    ("t5", {"language_model": 2, "encoder": 2},
     "encoder.block.0.layer.0.SelfAttention is in both prefix targets 'language_model' and 'encoder'"),
])
def test_target_errors(family, lengths, message):
    with pytest.raises(PrefixHookError, match=message):
        PrefixTunedModel(build(family), PrefixConfig(lengths=lengths))


def test_unknown_architecture_is_an_error():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(PrefixHookError, match="no prefix targets known for model type 'gpt2'"):
        PrefixTunedModel(gpt2, PrefixConfig(lengths={"language_model": 2}))


def test_a_module_the_implementation_does_not_reach_is_an_error(monkeypatch):
    base = build("opt")
    monkeypatch.setattr(base, "set_attn_implementation", lambda name: None)  # e.g. a model that ignores it
    with pytest.raises(PrefixHookError, match=r"model\.decoder\.layers\.0\.self_attn \(OPTAttention\) selects "
                                              r"attention 'sdpa'.*prefix would be ignored"):
        PrefixTunedModel(base, PrefixConfig(lengths={"language_model": 2}))


def test_every_family_has_a_finder_and_its_targets_are_recipe_targets():
    # target names live with the families (one list); each family's model type has a finder for them
    assert set(FINDERS) == set(BY_MODEL_TYPE)
    assert PREFIX_TARGETS == ("qformer", "vision", "language_model", "encoder", "decoder", "bert")


@pytest.mark.parametrize("kind", ["classic", "plus"])
def test_prefix_parameter_report(kind):
    model = PrefixTunedModel(build("blip2-t5"), PrefixConfig(lengths=LENGTHS["blip2-t5"], kind=kind,
                                                             encoder_hidden=8))
    report = prefix_parameter_report(model)
    total = sum(p.numel() for p in model.parameters())
    assert set(report) == {"qformer", "encoder", "decoder"}
    for target, row in report.items():
        n = sum(p.numel() for name, p in model.named_parameters() if name.startswith(f"prefixes.{target}."))
        assert row == {"params": n, "share": n / total}
    # encoder: 2 T5 layers, 4 heads x 4 dims, P=3, MLP hidden 8: embedding + type + Linear + Linear (+ gate)
    width, out = 16, 2 * 2 * 16
    expected = 3 * width + width + (width * 8 + 8) + (8 * out + out) + (2 * 4 if kind == "plus" else 0)
    assert report["encoder"]["params"] == expected


def test_prefix_parameter_report_counts_zero3_partitioned_parameters():
    model = PrefixTunedModel(build("opt"), PrefixConfig(lengths={"language_model": 2}, encoder="none"))
    kv = model.prefixes["language_model"].kv
    full = kv.numel()
    kv.data = torch.empty(0)  # as ZeRO-3 leaves a partitioned parameter on a rank
    kv.ds_numel = full
    report = prefix_parameter_report(model)
    assert report["language_model"]["params"] == full
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    assert report["language_model"]["share"] == full / total
