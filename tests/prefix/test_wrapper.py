"""The module-wrapper mechanism (ptscale.prefix.wrapper) on BLIP captioning and VQA, tiny random configs:
prefix length 0 is the base model; a wrapper owns no weights and, with its prefix disabled, computes exactly
what the module did; the wrappers equal an explicit float64 concat reference (forward and gradients, padding,
causality, classic and Prefix-Tuning+); arbitrary additive masks; generation with and without the KV cache;
gradient checkpointing; folding and the noise analysis; the kernel dispatch (stand-in kernel)."""

import copy
import logging
import sys
import types

import pytest
import torch
from transformers.models.blip.modeling_blip import BlipAttention
from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention

import ptscale.prefix.attention as attention
import ptscale.prefix.wrapper as wrapper
from ptscale.config import PrefixConfig
from ptscale.prefix.attention import SLOT_ATTR
from ptscale.prefix.model import PrefixTunedModel
from ptscale.prefix.wrapper import PrefixAttentionWrapper, split_mask, wrapped_attention
from tests.prefix.blip_families import (
    BLIP_FAMILIES,
    BLIP_LENGTHS,
    BOS,
    blip_batch,
    build_blip,
    explicit_wrapped_attention,
)
from tests.prefix.families import prefixed


def _wrap(family, *, kind="classic", lengths=None, **cfg):
    return prefixed(build_blip(family), lengths or BLIP_LENGTHS[family], kind=kind, **cfg)


def _wrapped(model):
    return {n: m for n, m in model.base.named_modules() if isinstance(m, PrefixAttentionWrapper)}


@pytest.mark.parametrize("family", BLIP_FAMILIES)
def test_prefix_length_zero_is_the_base_model(family):
    base = build_blip(family)
    reference = copy.deepcopy(base)
    model = PrefixTunedModel(base, PrefixConfig(lengths=dict.fromkeys(BLIP_LENGTHS[family], 0)))
    batch = blip_batch(family)
    with torch.no_grad():
        assert torch.equal(model(**batch).loss, reference(**batch).loss)
    assert not _wrapped(model) and base.config._attn_implementation == "eager"  # BLIP's masks are left as they are


@pytest.mark.parametrize("family", BLIP_FAMILIES)
def test_wrappers_own_no_weights_and_keep_every_name(family):
    base = build_blip(family)
    names = {n: p for n, p in base.named_parameters()}
    model = PrefixTunedModel(base, PrefixConfig(lengths=BLIP_LENGTHS[family], encoder_hidden=8))
    assert {n: p for n, p in base.named_parameters()}.keys() == names.keys()
    assert all(p is names[n] for n, p in base.named_parameters())  # the same parameters, not copies
    wrapped = _wrapped(model)
    assert all(not list(m.parameters(recurse=False)) for m in wrapped.values())
    targets = {n: getattr(m, SLOT_ATTR).target for n, m in wrapped.items()}
    expected = {f"vision_model.encoder.layers.{i}.self_attn": "vision" for i in range(2)}
    expected |= {f"text_decoder.bert.encoder.layer.{i}.attention.self": "decoder" for i in range(2)}
    if family == "blip-vqa":
        expected |= {f"text_encoder.encoder.layer.{i}.attention.self": "encoder" for i in range(2)}
    assert targets == expected
    # cross-attention to the image (the same class) is not wrapped; only the decoder's layers are causal
    assert not any("crossattention" in n for n in wrapped)
    assert {n for n, m in wrapped.items() if m.causal} == {n for n in expected if n.startswith("text_decoder.")}


@pytest.mark.parametrize("family", BLIP_FAMILIES)
def test_disabled_prefixes_run_the_original_forward_exactly(family):
    base = build_blip(family)
    reference = copy.deepcopy(base)
    model = _wrap(family)
    model.base.load_state_dict(reference.state_dict())
    batch = blip_batch(family)
    with torch.no_grad(), model.prefixes_disabled():
        assert torch.equal(model(**batch).loss, reference(**batch).loss)
    model.dormant = True
    with torch.no_grad():
        assert torch.equal(model(**batch).loss, reference(**batch).loss)


@pytest.mark.parametrize("kind", ["classic", "plus"])
@pytest.mark.parametrize("family", BLIP_FAMILIES)
def test_wrapper_equals_explicit_reference_float64(family, kind, monkeypatch):
    model = _wrap(family, kind=kind)
    batch = blip_batch(family)
    params = [p for p in model.parameters()]
    seen = []
    real = wrapper.wrapped_attention

    def spying(module, query, key, value, prefix, mask, **kw):
        seen.append((module.causal, mask))
        return real(module, query, key, value, prefix, mask, **kw)

    monkeypatch.setattr(wrapper, "wrapped_attention", spying)
    out = model(**batch)
    grads = torch.autograd.grad(out.loss, params, allow_unused=True)
    monkeypatch.setattr(wrapper, "wrapped_attention", explicit_wrapped_attention)
    ref = model(**batch)
    grads_ref = torch.autograd.grad(ref.loss, params, allow_unused=True)
    with model.prefixes_disabled():
        plain = model(**batch).loss
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=0)
    for (name, _), a, r in zip(model.named_parameters(), grads, grads_ref, strict=True):
        if a is None:
            assert r is None, name
            continue
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-13, msg=name)
    prefix_grads = [g for (n, _), g in zip(model.named_parameters(), grads, strict=True) if n.startswith("prefixes.")]
    assert all(g is not None and g.abs().sum() > 0 for g in prefix_grads)  # every prefix reaches the loss
    assert (out.loss - plain).abs() > 1e-4  # and the prefixes matter
    # The batch exercised the module's own masks: causal + padding in the decoder, padding in the encoder.
    decoder_masks = [m for causal, m in seen if causal]
    assert decoder_masks and all(m is not None and (m[:, 0] < -1e300).any(-1).all(-1).any() for m in decoder_masks)
    if family == "blip-vqa":
        assert any(m is not None and not causal for causal, m in seen)


@pytest.mark.parametrize("kind", ["classic", "plus"])
@pytest.mark.parametrize("binary", [True, False])
def test_a_modules_own_additive_mask_applies_to_sequence_keys_float64(kind, binary):
    """Any additive mask (0 / dtype-minimum, or arbitrary values) is added to the sequence scores as it is;
    prefix keys get none."""
    torch.manual_seed(0)
    b, h, length, d, p = 2, 2, 5, 4, 3
    q, k, v = (torch.randn(b, h, length, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    kv = torch.randn(2, h, p, d, dtype=torch.float64, requires_grad=True)
    if binary:
        mask = torch.zeros(b, 1, length, length, dtype=torch.float64)
        mask[1, :, :, -2:] = torch.finfo(torch.float64).min
        mask[0, :, :, 1] = torch.finfo(torch.float64).min
        assert split_mask(mask)[1] is None  # goes on as a boolean mask, the same tensor for every layer
        assert split_mask(mask)[0] is split_mask(mask)[0]
    else:
        mask = torch.randn(b, 1, length, length, dtype=torch.float64)
        assert split_mask(mask)[0] is None  # goes on as an additive bias
    if kind == "plus":
        from ptscale.prefix.plus import PlusLayer
        prefix = PlusLayer(kv[0], kv[1], torch.tensor([0.7, 1.3], dtype=torch.float64), "elu1")
    else:
        prefix = (kv[0], kv[1])
    module = torch.nn.Module()
    module.is_causal = False
    out = wrapped_attention(module, q, k, v, prefix, mask, scaling=0.4, dropout=0.0, causal=False)
    ref = explicit_wrapped_attention(module, q, k, v, prefix, mask, scaling=0.4, dropout=0.0, causal=False)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad((out * g).sum(), (q, k, v, kv)),
                    torch.autograd.grad((ref * g).sum(), (q, k, v, kv)), strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def _generate(model, family, batch, **kw):
    if family == "blip-caption":
        return model.generate(pixel_values=batch["pixel_values"], **kw)
    return model.generate(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                          attention_mask=batch["attention_mask"], **kw)


@pytest.mark.parametrize("family", BLIP_FAMILIES)
def test_generation_with_and_without_cache(family, monkeypatch):
    """Greedy and 4-beam search through the model's own generate(): identical tokens with and without the
    KV cache, and every call of a decoder layer sees exactly its P prefix positions plus the sequence keys
    (the cache holds sequence keys only)."""
    model = _wrap(family)
    batch = blip_batch(family)
    calls = []
    real = wrapper.wrapped_attention

    def recording(module, query, key, value, prefix, mask, **kw):
        slot = getattr(module, SLOT_ATTR)
        calls.append({"target": slot.target, "layer": slot.layer, "lq": query.shape[2], "lk": key.shape[2],
                      "p": prefix[0].shape[-2]})
        return real(module, query, key, value, prefix, mask, **kw)

    monkeypatch.setattr(wrapper, "wrapped_attention", recording)
    steps = 4
    run = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, return_dict_in_generate=True,
               output_scores=True)  # eos: BLIP passes its [SEP] itself
    outputs = {}
    for beams in (1, 4):
        for cache in (True, False):
            calls.clear()
            outputs[beams, cache] = _generate(model, family, batch, num_beams=beams, use_cache=cache, **run)
            assert calls and all(c["p"] == BLIP_LENGTHS[family][c["target"]] for c in calls)
            layer0 = [c for c in calls if c["target"] == "decoder" and c["layer"] == 0]
            assert len(layer0) == steps  # BLIP's decoders start from [BOS]: one token of prompt
            for t, c in enumerate(layer0):
                assert c["lk"] == 1 + t  # sequence keys only: no prefix in the cache
                assert c["lq"] == (1 if cache and t > 0 else 1 + t)
    for beams in (1, 4):
        cached, uncached = outputs[beams, True], outputs[beams, False]
        # Cached and uncached decoding are different computations: scores agree to rounding, not bitwise; the
        # tokens are equal wherever no two candidates are within rounding, which the greedy margins show.
        if beams == 1:
            for step in cached.scores:
                top2 = step.double().topk(2, dim=-1).values
                assert (top2[:, 0] - top2[:, 1]).min() > 1e-6
        assert torch.equal(cached.sequences, uncached.sequences)
        assert cached.sequences.shape[-1] == 1 + steps and (cached.sequences[:, 0] == BOS).all()
        for a, b in zip(cached.scores, uncached.scores, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    with model.prefixes_disabled():  # the prefix changes what is generated
        plain = _generate(model, family, batch, num_beams=4, **run)
    # A random BLIP (init std 0.02) has nearly flat logits: the prefix moves the beam scores by ~1e-3 here,
    # nine orders above the cached/uncached agreement checked above.
    assert (plain.sequences_scores - outputs[4, True].sequences_scores).abs().max() > 1e-4


@pytest.mark.filterwarnings("ignore:.*is deprecated:FutureWarning")
@pytest.mark.parametrize("family", BLIP_FAMILIES)
def test_gradient_checkpointing_gives_identical_gradients(family, monkeypatch):
    model = _wrap(family)
    model.train()
    batch = blip_batch(family)
    params = [p for _, p in model.named_parameters()]
    counts = []
    real = wrapper.wrapped_attention

    def run():
        n = {"calls": 0}

        def counting(*args, **kwargs):
            n["calls"] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(wrapper, "wrapped_attention", counting)
        loss = model(**batch).loss
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        counts.append(n["calls"])
        return loss, grads

    loss, grads = run()
    model.base.activation_checkpointing_enable({"use_reentrant": False})
    assert model.base.is_gradient_checkpointing
    loss_ckpt, grads_ckpt = run()
    assert counts[1] == 2 * counts[0]  # every prefixed attention ran again during backward
    # Recomputation inside torch.utils.checkpoint may order float64 reductions differently (~1e-16 relative);
    # a prefix missing on recomputation would move the loss by ~1e-2.
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-12, atol=0)
    for a, b in zip(grads, grads_ckpt, strict=True):
        if a is None:
            assert b is None
            continue
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["classic", "plus"])
def test_folding_and_noise_analysis(kind):
    family = "blip-vqa"
    model = _wrap(family, kind=kind)
    batch = blip_batch(family)
    with torch.no_grad():
        before = model(**batch).loss
        with model.prefixes_replaced_by_noise(seed=3):
            noisy = model(**batch).loss
            with torch.no_grad():
                again = model(**batch).loss
        model.fold_prefixes()
        folded = model(**batch).loss
    assert all(model.folded().values())
    torch.testing.assert_close(folded, before, rtol=1e-12, atol=0)  # same keys/values, computed once
    assert torch.equal(noisy, again) and (noisy - before).abs() > 1e-6


def test_a_class_without_wrapper_or_interface_is_an_error(monkeypatch):
    from ptscale.prefix.targets import PrefixHookError

    monkeypatch.setattr("ptscale.prefix.targets.WRAPPERS", {BlipAttention: wrapper.BlipAttentionWrapper})
    with pytest.raises(PrefixHookError, match=r"text_decoder\.bert\.encoder\.layer\.0\.attention\.self "
                                              r"\(BlipTextSelfAttention\) does not dispatch .* has no wrapper"):
        PrefixTunedModel(build_blip("blip-caption"), PrefixConfig(lengths={"decoder": 2}))


def test_wrapper_refuses_a_module_with_weights_of_its_own():
    module = BlipTextSelfAttention(build_blip("blip-caption").config.text_config, is_cross_attention=False)
    module.register_parameter("extra", torch.nn.Parameter(torch.zeros(1)))
    with pytest.raises(TypeError, match="has weights of its own"):
        wrapper.BlipTextSelfAttentionWrapper(module, causal=True)


# --- the Triton dispatch, checked with a stand-in kernel (the real one is CUDA-only) ---------------------------
@pytest.fixture
def stand_in_kernel(monkeypatch):
    monkeypatch.setattr(attention, "_backend_logged", set())
    calls = []

    def prefix_attention(q, k, v, prefix_k, prefix_v, *, key_padding_mask=None, causal=False, scale=None):
        calls.append({"key_padding_mask": key_padding_mask, "causal": causal})
        b, _, lq, lk = *q.shape[:3], k.shape[2]
        allowed = torch.ones(lq, lk, dtype=torch.bool).tril() if causal else torch.ones(lq, lk, dtype=torch.bool)
        mask = allowed[None, None].expand(b, 1, lq, lk)
        if key_padding_mask is not None:
            mask = mask & key_padding_mask[:, None, None, :]
        return explicit_wrapped_attention(None, q, k, v, (prefix_k, prefix_v), mask, scaling=scale, dropout=0.0,
                                          causal=causal).transpose(1, 2)

    fake = types.ModuleType("ptscale_kernels")
    fake.prefix_attention = prefix_attention
    fake.triton_available = lambda device: True
    monkeypatch.setitem(sys.modules, "ptscale_kernels", fake)
    monkeypatch.setattr(attention, "choose_backend", lambda query, dropout, **kw: "triton")  # CUDA-only otherwise
    return calls


def test_blip_decoder_masks_reach_the_kernel_as_causal_key_padding(stand_in_kernel, monkeypatch):
    """BLIP's additive causal + padding mask is exactly what the kernel takes: the decoder layers go to it
    (causal, with the key padding), the vision layers too (no mask); the result equals the reference path."""
    family = "blip-caption"
    model = _wrap(family)
    batch = blip_batch(family)
    with torch.no_grad():
        out = model(**batch).loss
    decoder = [c for c in stand_in_kernel if c["causal"]]
    assert len(decoder) == 2 and len(stand_in_kernel) == 4
    assert all(torch.equal(c["key_padding_mask"], batch["attention_mask"].bool()) for c in decoder)
    monkeypatch.setattr(attention, "choose_backend", lambda query, dropout, **kw: "reference")
    with torch.no_grad():
        ref = model(**batch).loss
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=0)


def test_an_arbitrary_additive_mask_keeps_the_reference_path_and_says_so(stand_in_kernel, monkeypatch, caplog):
    monkeypatch.setenv("PTSCALE_ATTENTION", "triton")
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 4, dtype=torch.float64) for _ in range(3))
    kv = torch.randn(2, 2, 3, 4, dtype=torch.float64)
    mask = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    module = torch.nn.Module()
    with caplog.at_level(logging.INFO, logger="ptscale.prefix.attention"):
        out = wrapped_attention(module, q, k, v, (kv[0], kv[1]), mask, scaling=0.5, dropout=0.0, causal=True)
    assert not stand_in_kernel
    assert [r.getMessage() for r in caplog.records] == [
        "prefix attention: reference path for an additive position bias or mask (the Triton kernel does not "
        "cover it)"]
    ref = explicit_wrapped_attention(module, q, k, v, (kv[0], kv[1]), mask, scaling=0.5, dropout=0.0, causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
