"""The prefix hook against an explicit float64 concat reference, at the attention function and through
the whole BLIP-2 model (Q-Former bidirectional, OPT causal, padding)."""

import copy

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ptscale.config import PrefixConfig
from ptscale.prefix.attention import SLOT_ATTR, PrefixSlot, PrefixStore, attach, prefix_attention_forward
from ptscale.prefix.model import PrefixTunedModel


def explicit_reference(q, k, v, pk, pv, *, causal, key_padding, scale):
    """softmax over [prefix; sequence] written out: every query sees every prefix position; sequence keys
    follow causality (bottom-right aligned) and padding."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    keys = torch.cat([pk.expand(b, -1, -1, -1), k], dim=2)
    vals = torch.cat([pv.expand(b, -1, -1, -1), v], dim=2)
    scores = q @ keys.transpose(-1, -2) * scale
    allowed = torch.ones(b, 1, lq, pk.shape[-2] + lk, dtype=torch.bool)
    for i in range(lq):
        for j in range(lk):
            ok = True
            if causal and j > i + (lk - lq):
                ok = False
            allowed[:, 0, i, pk.shape[-2] + j] = ok
    if key_padding is not None:
        allowed[:, 0, :, pk.shape[-2]:] &= key_padding[:, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ vals


class FakeAttention(torch.nn.Module):
    def __init__(self, causal):
        super().__init__()
        self.is_causal = causal


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("lq, lk", [(7, 7), (1, 9)])
def test_hook_equals_explicit_reference_float64(causal, padding, lq, lk):
    if lq != lk and not causal:
        lk = lq
    torch.manual_seed(0)
    b, h, d, p = 3, 2, 8, 5
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64, requires_grad=True) for n in (lq, lk, lk))
    pk, pv = (torch.randn(h, p, d, dtype=torch.float64, requires_grad=True) for _ in range(2))
    key_padding = None
    mask = None
    if padding:
        key_padding = torch.ones(b, lk, dtype=torch.bool)
        key_padding[0, :2] = False  # left padding
        key_padding[2, -1] = False  # right padding
        i = torch.arange(lq)[:, None] + (lk - lq)
        base = (torch.arange(lk)[None, :] <= i) if causal else torch.ones(lq, lk, dtype=torch.bool)
        mask = base[None, None] & key_padding[:, None, None, :]
    module = FakeAttention(causal)
    store = PrefixStore(active={"t": torch.stack([pk, pv])[None]})
    attach(module, PrefixSlot(store, "t", 0))
    out, _ = prefix_attention_forward(module, q, k, v, mask, scaling=d**-0.5)
    ref = explicit_reference(q, k, v, pk, pv, causal=causal, key_padding=key_padding, scale=d**-0.5).transpose(1, 2)
    rows = torch.ones(b, lq, dtype=torch.bool)
    if padding:  # fully padded query rows are undefined; compare real rows only
        rows = key_padding[:, -lq:] if causal else rows
    torch.testing.assert_close(out[rows], ref[rows], rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad((out[rows] * g[rows]).sum(), (q, k, v, pk, pv))
    grads_ref = torch.autograd.grad((ref[rows] * g[rows]).sum(), (q, k, v, pk, pv))
    for a, r in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def test_layer_without_slot_runs_plain_sdpa():
    module = FakeAttention(False)
    q = k = v = torch.randn(1, 2, 4, 8)
    out, _ = prefix_attention_forward(module, q, k, v, None, scaling=0.3)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3).transpose(1, 2)
    torch.testing.assert_close(out, ref)
    assert not hasattr(module, SLOT_ATTR)


def _batch(tokenizer, model, pad_second=True):
    torch.manual_seed(1)
    q = model.config.num_query_tokens
    img = model.config.image_token_id
    ids = torch.tensor([[img] * q + [2, 7, 8, 9, 10], [img] * q + [2, 7, 8, 1, 1]])
    mask = torch.ones_like(ids)
    if pad_second:
        mask[1, -2:] = 0
    return {"pixel_values": torch.randn(2, 3, 32, 32), "input_ids": ids, "attention_mask": mask}


def test_prefix_length_zero_is_the_base_model(tiny_backbone):
    base, tok, _ = tiny_backbone
    reference = copy.deepcopy(base)
    wrapped = PrefixTunedModel(base, PrefixConfig(lengths={"qformer": 0, "language_model": 0}))
    batch = _batch(tok, base)
    with torch.no_grad():
        assert torch.equal(wrapped(**batch).logits, reference(**batch).logits)
    assert len(wrapped.prefixes) == 0


def _plain_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    slot = getattr(module, SLOT_ATTR, None)
    kv = slot.get() if slot else None
    b, _, lq, d = query.shape
    lk = key.shape[2]
    if kv is None:
        pk = pv = query.new_zeros(query.shape[1], 0, d)
    else:
        pk, pv = kv
    causal = getattr(module, "is_causal", False)
    key_padding = None
    if attention_mask is not None:  # recover the padding from the model's own 4D mask
        key_padding = attention_mask[:, 0, -1, :] if causal else attention_mask[:, 0, 0, :]
        key_padding = key_padding.expand(b, lk)
    out = explicit_reference(query, key, value, pk, pv, causal=causal and lq > 1, key_padding=key_padding,
                             scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def test_model_hook_equals_concat_reference_float64(tiny_backbone):
    """Whole model, float64: forward logits and every prefix-encoder gradient."""
    base, tok, _ = tiny_backbone
    base = base.double()
    model = PrefixTunedModel(base, PrefixConfig(lengths={"qformer": 3, "language_model": 5}, encoder_hidden=16))
    model.double()
    batch = _batch(tok, base)
    batch["pixel_values"] = batch["pixel_values"].double()
    out = model(**batch, labels=batch["input_ids"])
    grads = torch.autograd.grad(out.loss, list(model.prefixes.parameters()))
    AttentionInterface.register("ptscale_test_ref", _plain_reference)
    AttentionMaskInterface.register("ptscale_test_ref", sdpa_mask)
    base.set_attn_implementation("ptscale_test_ref")
    ref = model(**batch, labels=batch["input_ids"])
    grads_ref = torch.autograd.grad(ref.loss, list(model.prefixes.parameters()))
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits[real], ref.logits[real], rtol=1e-10, atol=1e-10)
    for a, r in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-12)
    assert all(g.abs().sum() > 0 for g in grads)  # every encoder parameter reaches the loss


def test_prefix_changes_outputs_and_can_be_disabled(tiny_backbone):
    base, tok, _ = tiny_backbone
    plain = copy.deepcopy(base)
    model = PrefixTunedModel(base, PrefixConfig(lengths={"qformer": 4, "language_model": 4}, init_std=0.5))
    batch = _batch(tok, base, pad_second=False)
    with torch.no_grad():
        with_prefix = model(**batch).logits
        with model.prefixes_disabled():
            without = model(**batch).logits
        reference = plain(**batch).logits
    assert not torch.allclose(with_prefix, reference)
    torch.testing.assert_close(without, reference)
