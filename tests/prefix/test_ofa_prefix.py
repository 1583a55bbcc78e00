"""Prefixes in OFA's self-attention through the module wrapper (``OFAAttentionWrapper``), float64: length 0 and
disabled prefixes are the base model exactly; one prefixed OFAAttention equals an explicit concat computation
(forward and gradients, with padding, causality and OFA's position bias); the whole prefixed model equals the same
attention written out; the wrapper keeps every parameter name; decoding with the cache equals the full prefixed
forward (the prefix never enters the cache); Prefix-Tuning+ runs on OFA."""

import copy

import pytest
import torch

import ptscale.prefix.wrapper as wrapper
from ptscale.config import PrefixConfig
from ptscale.models.ofa import OFAAttention
from ptscale.prefix.attention import SLOT_ATTR, PrefixSlot, PrefixStore, attach
from ptscale.prefix.model import PrefixTunedModel
from ptscale.prefix.wrapper import OFAAttentionWrapper, PrefixAttentionWrapper
from tests.prefix.families import explicit_plus, prefixed
from tests.prefix.ofa_families import build_ofa, ofa_batch, prompt

LENGTHS = {"encoder": 3, "decoder": 2}
GENERATE = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)


def _inputs(batch: dict) -> dict:
    return {**prompt(batch), "decoder_input_ids": batch["decoder_input_ids"]}


def _frozen(model):
    """``model`` with requires_grad off, as PrefixTunedModel leaves its base by default. The exact comparisons need it:
    for a non-contiguous 3-D input (image_proj reads the ResNet's transposed features) torch's matmul takes another
    path when a weight requires grad, even under no_grad, and the float64 logits then differ by ~1e-15."""
    return model.requires_grad_(False)


def _wrapped(model) -> dict:
    return {n: m for n, m in model.base.named_modules() if isinstance(m, PrefixAttentionWrapper)}


# --- no prefix: the base model, bit for bit --------------------------------------------------------------------------
@pytest.mark.parametrize("lengths", [{"language_model": 0}, {"encoder": 0, "decoder": 0}])
def test_prefix_length_zero_is_the_base_model(lengths):
    base = build_ofa()
    reference = _frozen(copy.deepcopy(base))
    model = PrefixTunedModel(base, PrefixConfig(lengths=lengths))
    batch = ofa_batch()
    assert not _wrapped(model) and len(model.prefixes) == 0
    with torch.no_grad():
        assert torch.equal(model(**_inputs(batch)).logits, reference(**_inputs(batch)).logits)
        for beams in (1, 3):
            assert torch.equal(model.generate(**prompt(batch), num_beams=beams, **GENERATE),
                               reference.generate(**prompt(batch), num_beams=beams, **GENERATE))


def test_disabled_or_dormant_prefixes_run_the_original_forward_exactly():
    base = build_ofa()
    reference = copy.deepcopy(base)
    model = prefixed(base, LENGTHS)
    batch = ofa_batch()
    with torch.no_grad():
        want = reference(**_inputs(batch)).logits
        want_tokens = reference.generate(**prompt(batch), num_beams=3, **GENERATE)
        with model.prefixes_disabled():
            assert torch.equal(model(**_inputs(batch)).logits, want)
            assert torch.equal(model.generate(**prompt(batch), num_beams=3, **GENERATE), want_tokens)
        assert (model(**_inputs(batch)).logits - want).abs().max() > 1e-3  # and enabled, the prefixes matter
        model.dormant = True
        assert torch.equal(model(**_inputs(batch)).logits, want)


def test_the_wrapper_keeps_every_name_and_wraps_self_attention_only():
    base = build_ofa()
    keys = list(base.state_dict())
    params = dict(base.named_parameters())
    model = PrefixTunedModel(base, PrefixConfig(lengths=LENGTHS, encoder_hidden=8))
    assert list(base.state_dict()) == keys  # the same keys in the same order: checkpoints load either way
    assert "encoder.layers.0.self_attn.c_attn" in keys and "decoder.layers.1.self_attn.c_attn" in keys
    assert all(p is params[n] for n, p in base.named_parameters())  # the same parameters, not copies
    wrapped = _wrapped(model)
    expected = {f"{s}.layers.{i}.self_attn": s for s in ("encoder", "decoder") for i in range(2)}
    assert {n: getattr(m, SLOT_ATTR).target for n, m in wrapped.items()} == expected
    assert all(type(m) is OFAAttentionWrapper for m in wrapped.values())
    assert all(type(layer.cross_attn) is OFAAttention for layer in base.decoder.layers)  # never cross-attention
    assert {n for n, m in wrapped.items() if m.causal} == {n for n in expected if n.startswith("decoder.")}
    # the one weight of OFAAttention itself, c_attn, is adopted under its own name; the rest are submodules
    assert all([n for n, _ in m.named_parameters(recurse=False)] == ["c_attn"] for m in wrapped.values())
    assert [getattr(m, SLOT_ATTR).layer for m in wrapped.values()] == [0, 1, 0, 1]


# --- one prefixed OFAAttention against an explicit concat ------------------------------------------------------------
H, D, P = 4, 8, 3


def _explicit_ofa_attention(module: OFAAttention, hidden, prefix_k, prefix_v, mask, bias):
    """OFA's attention with a prefix, written out per sample and head: q = (x Wq + bq) / sqrt(2 D); scores over
    [prefix keys; sequence keys]; the sequence columns get the position bias (per head) and the additive mask, the
    prefix columns neither; softmax; times [prefix values; sequence values]; per-head scale c_attn; out_proj."""
    b, length, d = hidden.shape
    q = (hidden @ module.q_proj.weight.T + module.q_proj.bias).view(b, length, H, D)
    k = (hidden @ module.k_proj.weight.T + module.k_proj.bias).view(b, length, H, D)
    v = (hidden @ module.v_proj.weight.T + module.v_proj.bias).view(b, length, H, D)
    heads = []
    for i in range(b):
        per_head = []
        for h in range(H):
            scores = (q[i, :, h] * (2 * D) ** -0.5) @ torch.cat([prefix_k[h], k[i, :, h]]).T  # (L, P + L)
            extra = torch.cat([scores.new_zeros(length, P), bias[i, h] + mask[i, 0]], dim=1)
            probs = torch.softmax(scores + extra, dim=-1)
            per_head.append(module.c_attn[h] * (probs @ torch.cat([prefix_v[h], v[i, :, h]])))
        heads.append(torch.cat(per_head, dim=-1))  # (L, H * D)
    return torch.stack(heads) @ module.out_proj.weight.T + module.out_proj.bias


@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "decoder"])
def test_prefixed_attention_equals_an_explicit_concat_float64(causal):
    """Forward and every gradient: projections, prefix keys/values, c_attn, out_proj and the hidden states. The
    mask is additive as the encoder / decoder builds it (the dtype's minimum where blocked): key padding, and for
    the decoder causality too; the position bias is random per sample and head."""
    torch.manual_seed(0)
    b, length = 2, 6
    module = OFAAttention(H * D, H, 0.0, layer_idx=0).double()
    with torch.no_grad():
        module.c_attn.uniform_(0.5, 1.5)
    kv = torch.randn(1, 2, H, P, D, dtype=torch.float64, requires_grad=True)  # (layers, K/V, H, P, D)
    layer = OFAAttentionWrapper(module, causal=causal)
    attach(layer, PrefixSlot(PrefixStore(active={"t": kv}), "t", 0))
    hidden = torch.randn(b, length, H * D, dtype=torch.float64, requires_grad=True)
    blocked = torch.zeros(b, 1, 1, length, dtype=torch.bool)
    blocked[1, ..., -2:] = True  # the second row's last two tokens are padding
    if causal:
        blocked = blocked | torch.ones(length, length, dtype=torch.bool).triu(1)[None, None]
    mask = torch.zeros(blocked.shape, dtype=torch.float64).masked_fill(blocked, torch.finfo(torch.float64).min)
    bias = torch.randn(b, H, length, length, dtype=torch.float64)
    out = layer(hidden, attention_mask=mask, attn_bias=bias)[0]
    ref = _explicit_ofa_attention(module, hidden, kv[0, 0], kv[0, 1], mask.expand(b, 1, length, length), bias)
    # float64; SDPA over a concatenation and the loop above order the same sums differently (~1e-15 relative)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    weights = [module.q_proj.weight, module.k_proj.weight, module.v_proj.weight, module.q_proj.bias,
               module.out_proj.weight, module.c_attn, kv, hidden]
    g = torch.randn_like(ref)
    got = torch.autograd.grad((out * g).sum(), weights)
    want = torch.autograd.grad((ref * g).sum(), weights)
    for name, a, r in zip(("q_proj", "k_proj", "v_proj", "q_bias", "out_proj", "c_attn", "prefix", "hidden"), got,
                          want, strict=True):
        assert r.abs().max() > 0, name
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12, msg=name)
    # the references can fail: the prefix matters, and so do the bias and the mask
    without = OFAAttention.forward(layer, hidden, attention_mask=mask, attn_bias=bias)[0]
    assert (without - out).abs().max() > 1e-2
    unbiased = _explicit_ofa_attention(module, hidden, kv[0, 0], kv[0, 1], mask.expand(b, 1, length, length),
                                       torch.zeros_like(bias))
    assert (unbiased - ref).abs().max() > 1e-2


# --- the whole prefixed model against the attention written out ------------------------------------------------------
def _explicit_wrapped_attention(module, query, key, value, prefix, attention_mask, *, scaling, dropout, causal):
    """What ``wrapped_attention`` computes for OFA, written out: ``attention_mask`` is OFA's mask + position bias,
    (B|1, H|1, Lq, Lk) over the sequence keys; classic: softmax over [prefix; sequence] with the prefix columns
    unbiased; Prefix-Tuning+: softmax over the sequence plus the explicit memory term. (B, L, H, D) out."""
    assert dropout == 0.0
    b, h, lq, d = query.shape
    plus = None if isinstance(prefix, tuple) else prefix
    pk, pv = (query.new_zeros(h, 0, d),) * 2 if plus is not None else prefix
    p = pk.shape[1]
    out = torch.empty_like(query)
    for i in range(b):
        for head in range(h):
            scores = query[i, head] @ torch.cat([pk[head], key[i, head]]).T * scaling
            bias = attention_mask[min(i, attention_mask.shape[0] - 1), min(head, attention_mask.shape[1] - 1)]
            scores = scores + torch.cat([scores.new_zeros(lq, p), bias.expand(lq, -1)], dim=1)
            out[i, head] = torch.softmax(scores, dim=-1) @ torch.cat([pv[head], value[i, head]])
    if plus is not None:
        out = out + explicit_plus(query, plus.keys, plus.values, plus.gate, plus.feature_map, scaling)
    return out.transpose(1, 2)


@pytest.mark.parametrize("kind", ["classic", "plus"])
def test_the_prefixed_model_equals_its_attention_written_out_float64(kind, monkeypatch):
    """The whole model (padding in the encoder, causality in the decoder, the bias of every layer), forward and the
    gradient of every parameter, base and prefix."""
    model = prefixed(build_ofa(), LENGTHS, kind=kind)
    batch = ofa_batch()
    g = torch.randn(2, 5, model.config.vocab_size, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    params = [p for _, p in model.named_parameters()]
    seen = []
    real = wrapper.wrapped_attention

    def spying(module, query, key, value, prefix, mask, **kw):
        seen.append((module.causal, mask))
        return real(module, query, key, value, prefix, mask, **kw)

    monkeypatch.setattr(wrapper, "wrapped_attention", spying)
    out = model(**_inputs(batch)).logits
    grads = torch.autograd.grad((out * g).sum(), params, allow_unused=True)
    monkeypatch.setattr(wrapper, "wrapped_attention", _explicit_wrapped_attention)
    ref = model(**_inputs(batch)).logits
    grads_ref = torch.autograd.grad((ref * g).sum(), params, allow_unused=True)
    # float64: the same sums in a different order (~1e-15 relative), through 2 + 2 layers
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-11)
    for (name, _), a, r in zip(model.named_parameters(), grads, grads_ref, strict=True):
        assert (a is None) == (r is None), name
        if a is not None:
            torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-11, msg=name)
    prefix_grads = [g for (n, _), g in zip(model.named_parameters(), grads, strict=True) if n.startswith("prefixes.")]
    assert prefix_grads and all(g is not None and g.abs().sum() > 0 for g in prefix_grads)
    # every wrapped layer ran, each with its bias and mask: padding in the encoder, causality in the decoder
    assert len(seen) == 4
    encoder = [m for causal, m in seen if not causal]
    decoder = [m for causal, m in seen if causal]
    assert all((m[1, :, :, -3:] < -1e300).all() and (m[0] > -1e300).all() for m in encoder)
    assert all((m[..., 0, 1:] < -1e300).all() and (m.diagonal(dim1=-2, dim2=-1) > -1e300).all() for m in decoder)
    # and OFA's position bias in each: the seen scores are not all 0
    assert all(((m > -1e300) & (m != 0)).any() for _, m in seen)


# --- decoding with the cache -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["classic", "plus"])
def test_step_by_step_decoding_equals_the_full_prefixed_forward(kind, monkeypatch):
    """The cache holds the sequence keys only: after t tokens its length is t, each decoder call sees its P prefix
    positions plus t keys, and the positions OFA takes from the cache length are the tokens' own."""
    model = prefixed(build_ofa(), LENGTHS, kind=kind)
    batch = ofa_batch()
    dec = batch["decoder_input_ids"]
    calls = []
    real = wrapper.wrapped_attention

    def recording(module, query, key, value, prefix, mask, **kw):
        slot = getattr(module, SLOT_ATTR)
        calls.append((slot.target, slot.layer, query.shape[2], key.shape[2]))
        return real(module, query, key, value, prefix, mask, **kw)

    with torch.no_grad():
        full = model(**_inputs(batch)).logits
        monkeypatch.setattr(wrapper, "wrapped_attention", recording)
        out = model(**prompt(batch), decoder_input_ids=dec[:, :1], use_cache=True)
        cache, pieces = out.past_key_values, [out.logits]
        for t in range(1, dec.shape[1]):
            assert cache.self_attention_cache.get_seq_length() == t  # no prefix positions in the cache
            calls.clear()
            out = model(**prompt(batch), decoder_input_ids=dec[:, t:t + 1], past_key_values=cache, use_cache=True)
            pieces.append(out.logits)
            assert [c for c in calls if c[0] == "decoder"] == [("decoder", i, 1, t + 1) for i in range(2)]
    # float64; one token at a time against the full forward: the same products summed in other shapes
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("beams", [1, 3])
def test_prefix_tuning_plus_on_ofa(beams):
    """Prefix-Tuning+ (prefix.kind plus): forward and backward reach the memory and its gates; cached and uncached
    decoding give the same tokens; a fresh (zero-gate) plus prefix leaves the base model as it was."""
    batch = ofa_batch()
    fresh = PrefixTunedModel(build_ofa(), PrefixConfig(lengths=LENGTHS, kind="plus", encoder_hidden=8))
    with torch.no_grad():
        # the gate is 0, so the memory adds exactly 0; the sequence part runs through SDPA instead of OFA's own
        # softmax, which orders the float64 sums differently (~1e-15)
        torch.testing.assert_close(fresh(**_inputs(batch)).logits, _frozen(build_ofa())(**_inputs(batch)).logits,
                                   rtol=1e-10, atol=1e-12)
    model = prefixed(build_ofa(), LENGTHS, kind="plus")
    model.train()
    loss = model(**prompt(batch), labels=batch["labels"]).loss
    loss.backward()
    assert torch.isfinite(loss)
    for target in LENGTHS:
        gate = model.prefixes[target].gate.grad
        memory = [p.grad for p in model.prefixes[target].source.parameters()]
        assert gate is not None and gate.abs().min() > 0, target  # every layer and head
        assert all(g is not None and g.abs().sum() > 0 for g in memory), target
    model.eval()
    run = dict(GENERATE, num_beams=beams, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        cached = model.generate(**prompt(batch), use_cache=True, **run)
        uncached = model.generate(**prompt(batch), use_cache=False, **run)
        with model.prefixes_disabled():
            plain = model.generate(**prompt(batch), use_cache=True, **run)
    if beams == 1:  # greedy margins far above rounding: equal tokens are the expected outcome
        for step in cached.scores:
            top2 = step.topk(2, dim=-1).values
            assert (top2[:, 0] - top2[:, 1]).min() > 1e-6
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.scores, uncached.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)  # float64, different shapes of the same sums
    assert max((a - b)[a.isfinite()].abs().max() for a, b in zip(plain.scores, cached.scores, strict=True)) > 1e-3
