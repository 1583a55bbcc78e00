"""The memory plan's parameter counts and byte arithmetic, checked against hand computations for the tiny
preset."""

from __future__ import annotations

from ptscale.config import LoraConfig, PrefixConfig
from ptscale.training.memory_plan import ZeroBuffers, count_parameters, plan_rank
from tests.launch import ROOT


def _linear(i: int, o: int) -> int:
    return i * o + o


def _tiny_expected(vocab: int) -> dict[str, int]:
    """tiny-blip2-opt from presets.py: ViT 64/128/2 layers at 48 px, patch 8; Q-Former 64/128/2 layers,
    cross-attention every 2nd layer (layer 0), 32 query tokens; OPT 128/256/2 layers, 128 positions."""
    vh, vi = 64, 128
    patches = (48 // 8) ** 2
    vision = vh + (patches + 1) * vh + (vh * 3 * 8 * 8 + vh)  # class emb, positions, patch conv
    vision += 2 * (_linear(vh, 3 * vh) + _linear(vh, vh) + 2 * vh + _linear(vh, vi) + _linear(vi, vh) + 2 * vh)
    vision += 2 * vh  # post_layernorm
    qh, qi = 64, 128
    attention = 3 * _linear(qh, qh) + _linear(qh, qh) + 2 * qh  # q, k, v, output dense, LayerNorm
    ffn = _linear(qh, qi) + _linear(qi, qh) + 2 * qh
    qformer = 32 * qh + 2 * qh + 2 * (attention + ffn) + attention  # query tokens, LayerNorm, layers, 1 cross
    th, tf = 128, 256
    layer = 4 * _linear(th, th) + 2 * th + _linear(th, tf) + _linear(tf, th) + 2 * th
    language_model = 2 * layer + 2 * th  # + final LayerNorm
    embeddings = vocab * th + (128 + 2) * th  # OPT's learned positions carry an offset of 2; lm_head is tied

    def prefix(width: int, layers: int, length: int = 8, hidden: int = 512) -> int:
        return length * width + width + _linear(width, hidden) + _linear(hidden, layers * 2 * width)

    # the default targets: self-attention q/k/v x 2 layers in the Q-Former and in OPT
    lora = 16 * (3 * 2 * (qh + qh)) + 16 * (3 * 2 * (th + th))
    return {"prefix": prefix(qh, 2) + prefix(th, 2), "lora": lora, "adapter": 0, "embeddings": embeddings,
            "lm_head": 0, "vision": vision, "qformer": qformer, "projection": _linear(qh, th),
            "language_model": language_model, "text_encoder": 0, "text_decoder": 0,  # BLIP's
            "bert": 0}  # VinVL's


# The hand counts below use a 512-wide prefix MLP (Li & Liang's width; the recipe default is 64 for the tiny model).
P512 = PrefixConfig(encoder_hidden=512)


def test_parameter_counts_match_hand_computation_for_the_tiny_preset():
    counts = count_parameters("tiny-blip2-opt", P512, LoraConfig(), vocab_size=100)
    assert counts.groups == _tiny_expected(100)
    # The largest module: OPT's prefix MLP output layer, Linear(512 -> 2 layers x K/V x 128).
    assert counts.largest_module == _linear(512, 2 * 2 * 128)
    assert counts.trainable("prefix") == counts.groups["prefix"]
    assert counts.trainable("prefix+full") == counts.total - counts.groups["embeddings"] - counts.groups["lora"]


def test_parameter_counts_match_a_materialised_model():
    """Meta-device counting equals counting real tensors (same groups, tied weights once)."""
    import torch
    from transformers import Blip2ForConditionalGeneration

    from ptscale.models.groups import group_sizes
    from ptscale.models.presets import blip2_config
    from ptscale.prefix.model import PrefixTunedModel
    from ptscale.tuners.lora import inject_lora

    torch.manual_seed(0)
    model = PrefixTunedModel(Blip2ForConditionalGeneration(blip2_config("tiny-blip2-opt", vocab_size=100)),
                             PrefixConfig())
    inject_lora(model, LoraConfig())
    assert count_parameters("tiny-blip2-opt", vocab_size=100).groups == group_sizes(model)


def test_bytes_per_rank_by_hand():
    counts = count_parameters("tiny-blip2-opt", P512, vocab_size=100)
    t = counts.trainable("prefix")  # 495,040 -> 123,760 per rank on 4 ranks
    assert t == 495_040
    part = 123_760
    small = ZeroBuffers(reduce_bucket_size=1000, sub_group_size=100_000, max_live_parameters=5000,
                        prefetch_bucket_size=500, offload_param=False, offload_optimizer=False)
    plan = plan_rank(counts, "prefix", 4, small)
    assert plan.trainable_bytes == 2 * part
    assert plan.frozen_bytes == 2 * -(-(counts.total - t) // 4)
    assert plan.gradient_bytes == 2 * part + 4 * 100_000  # bf16 partition + fp32 copy of one sub-group
    assert plan.optimizer_bytes == 12 * part
    assert plan.buffer_bytes == 2 * 1000 + 2 * (5000 + 500)
    assert plan.device_bytes == (plan.trainable_bytes + plan.frozen_bytes + plan.gradient_bytes
                                 + plan.optimizer_bytes + plan.buffer_bytes)
    assert plan.host_bytes == 0
    offload = plan_rank(counts, "prefix", 4, ZeroBuffers(1000, 100_000, 5000, 500, True, True))
    assert offload.device_bytes == offload.buffer_bytes
    assert offload.gradient_bytes == (2 + 4) * part  # bf16 partition + whole fp32 gradient buffer on the host
    assert offload.host_bytes == 2 * part + offload.frozen_bytes + offload.gradient_bytes + 12 * part


def test_shipped_deepspeed_configs_give_the_expected_zero_settings():
    from ptscale.training.engine import load_ds_template

    plain = ZeroBuffers.from_ds_config(load_ds_template(ROOT / "ds_configs" / "zero3.json"))
    offload = ZeroBuffers.from_ds_config(load_ds_template(ROOT / "ds_configs" / "zero3_offload.json"))
    assert (plain.offload_param, plain.offload_optimizer) == (False, False)
    assert (offload.offload_param, offload.offload_optimizer) == (True, True)
    assert plain.reduce_bucket_size == 500_000_000  # DeepSpeed 0.19.8's default: zero3.json leaves it unset


