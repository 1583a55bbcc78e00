"""The attention hook with the real Triton kernels (run by the Triton interpreter on CPU, see conftest.py), against
the hook's own reference path: a whole tiny BLIP-2 (Q-Former and OPT self-attention, both prefix kinds), an
OPT-2.7B-shaped attention call (head dim 80, causal, padded), and masks the kernels cannot express.

The hook only picks the kernel on CUDA tensors; ``choose_backend`` is forced to "triton" here so that the CPU
tensors reach it, and the kernel entry points are wrapped to count that they really ran."""

from __future__ import annotations

import logging

import ptscale_kernels
import pytest
import torch

import ptscale.prefix.attention as attention
from ptscale.config import PrefixConfig
from ptscale.prefix.attention import PrefixSlot, PrefixStore, attach, prefix_attention_forward
from ptscale.prefix.model import PrefixTunedModel


@pytest.fixture
def kernel_calls(monkeypatch):
    """Force the kernel path and count the calls into both kernels."""
    calls = {"classic": 0, "plus": 0}
    real_classic, real_plus = ptscale_kernels.prefix_attention, ptscale_kernels.prefix_plus_attention

    def classic(*args, **kwargs):
        calls["classic"] += 1
        return real_classic(*args, **kwargs)

    def plus(*args, **kwargs):
        calls["plus"] += 1
        return real_plus(*args, **kwargs)

    monkeypatch.setattr(ptscale_kernels, "prefix_attention", classic)
    monkeypatch.setattr(ptscale_kernels, "prefix_plus_attention", plus)
    monkeypatch.setattr(attention, "_backend_logged", set())
    monkeypatch.setattr(attention, "_mask_verdicts", {})
    return calls


def _force(monkeypatch, backend: str) -> None:
    monkeypatch.setattr(attention, "choose_backend", lambda query, dropout, variant="classic": backend)


def _batch(model: PrefixTunedModel) -> dict:
    gen = torch.Generator().manual_seed(5)
    q, img = model.config.num_query_tokens, model.config.image_token_id
    text = torch.randint(5, model.config.text_config.vocab_size, (3, 6), generator=gen)
    text[text == img] = 5  # no stray image placeholders in the text
    ids = torch.cat([torch.full((3, q), img), text], 1)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # right padding
    mask[2, -1] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"pixel_values": torch.randn(3, 3, 32, 32, generator=gen), "input_ids": ids, "attention_mask": mask,
            "labels": labels}


@pytest.mark.parametrize("kind", ["classic", "plus"])
def test_tiny_blip2_through_the_kernel_matches_the_reference(tiny_backbone, kernel_calls, monkeypatch, kind):
    base, _, _ = tiny_backbone
    torch.manual_seed(0)
    model = PrefixTunedModel(base, PrefixConfig(lengths={"qformer": 5, "language_model": 3}, encoder_hidden=8,
                                                kind=kind))
    if kind == "plus":  # gates start at 0 (no memory term); make them count
        for name, p in model.prefixes.named_parameters():
            if "gate" in name:
                p.data.normal_()
    batch = _batch(model)
    params = [p for p in model.prefixes.parameters() if p.requires_grad]
    layers = base.config.qformer_config.num_hidden_layers + base.config.text_config.num_hidden_layers
    monkeypatch.setattr(attention, "served", {})

    def loss_and_grads():
        loss = model(**batch).loss
        return loss.detach(), torch.autograd.grad(loss, params)

    _force(monkeypatch, "reference")
    want, want_grads = loss_and_grads()
    assert attention.served == {(kind, "reference"): layers}
    attention.served.clear()
    _force(monkeypatch, "triton")
    got, got_grads = loss_and_grads()
    assert kernel_calls[kind] == layers and kernel_calls["plus" if kind == "classic" else "classic"] == 0
    assert attention.served == {(kind, "triton"): layers}
    # fp32 on both paths, different summation orders (online softmax in tiles vs SDPA): rounding only.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


class _Attention(torch.nn.Module):
    def __init__(self, causal: bool):
        super().__init__()
        self.is_causal = causal


def _opt_call(causal: bool, mask_kind: str):
    """An OPT-2.7B-shaped attention call (head dim 80) at small B, H, L, in float32."""
    gen = torch.Generator().manual_seed(11)
    b, h, length, p, d = 2, 2, 13, 4, 80
    q, k, v = (torch.randn(b, h, length, d, generator=gen, requires_grad=True) for _ in range(3))
    kv = torch.randn(1, 2, h, p, d, generator=gen, requires_grad=True)
    module = _Attention(causal)
    attach(module, PrefixSlot(PrefixStore(active={"t": kv}), "t", 0))
    pad = torch.ones(b, length, dtype=torch.bool)
    pad[1, -3:] = False
    allowed = torch.ones(length, length, dtype=torch.bool)
    if causal:
        allowed = torch.tril(allowed)
    mask = allowed[None, None] & pad[:, None, None, :]
    if mask_kind == "block-diagonal":  # two packed sequences: neither causal-and-padding nor padding only
        seg = (torch.arange(length) >= 6).long()
        mask = mask & (seg[:, None] == seg[None, :])[None, None]
    elif mask_kind == "row-holes":  # one query row may not see one key that the others see
        mask = mask.clone()
        mask[0, 0, length - 1, 2] = False
    return module, [q, k, v, kv], mask


@pytest.mark.parametrize("causal", [False, True])
def test_opt_shaped_call_through_the_kernel(kernel_calls, monkeypatch, causal):
    module, leaves, mask = _opt_call(causal, "padding")
    grad = torch.randn(2, 13, 2, 80, generator=torch.Generator().manual_seed(3))
    results = {}
    for backend in ("reference", "triton"):
        _force(monkeypatch, backend)
        out, _ = prefix_attention_forward(module, *leaves[:3], mask, scaling=80 ** -0.5)
        results[backend] = (out.detach(), torch.autograd.grad((out * grad).sum(), leaves))
    assert kernel_calls["classic"] == 1
    (want, want_grads), (got, got_grads) = results["reference"], results["triton"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # fp32, tiled vs one SDPA: rounding only
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mask_kind", ["block-diagonal", "row-holes"])
@pytest.mark.parametrize("causal", [False, True])
def test_masks_the_kernel_cannot_express_take_the_reference(kernel_calls, monkeypatch, caplog, causal, mask_kind):
    module, leaves, mask = _opt_call(causal, mask_kind)
    _force(monkeypatch, "triton")
    with caplog.at_level(logging.WARNING, logger="ptscale.prefix.attention"):
        out, _ = prefix_attention_forward(module, *leaves[:3], mask, scaling=0.1)
        again, _ = prefix_attention_forward(module, *leaves[:3], mask, scaling=0.1)
    assert kernel_calls["classic"] == 0
    assert [r.getMessage() for r in caplog.records] == [
        "prefix attention: reference path for a mask that is neither causal nor key padding "
        "(the Triton kernel does not cover it)"]
    _force(monkeypatch, "reference")
    want, _ = prefix_attention_forward(module, *leaves[:3], mask, scaling=0.1)
    # The same reference computation on the same inputs: identical by construction.
    assert torch.equal(out, want) and torch.equal(again, want)


def test_mask_verdict_is_computed_once_per_mask(kernel_calls, monkeypatch):
    module, leaves, mask = _opt_call(True, "padding")
    _force(monkeypatch, "triton")
    equal_calls = []
    real_equal = torch.equal
    monkeypatch.setattr(torch, "equal", lambda a, b: equal_calls.append(1) or real_equal(a, b))
    for _ in range(3):  # three layers handed the same mask tensor
        prefix_attention_forward(module, *leaves[:3], mask, scaling=0.1)
    assert len(equal_calls) == 1 and kernel_calls["classic"] == 3
    mask[1, 0, 4, 0] = False  # an in-place change bumps the version: checked again, and now refused
    prefix_attention_forward(module, *leaves[:3], mask, scaling=0.1)
    assert len(equal_calls) == 2 and kernel_calls["classic"] == 3
