"""Backend dispatch of the prefix hook: PTSCALE_ATTENTION, the once-logged reference fallback, the clear
error when the Triton kernel is forced but cannot run, the contract with ``ptscale_kernels.prefix_attention``
(checked with a stand-in kernel), and the reference path's T5 position bias and grouped-query heads."""

import logging
import sys
import types

import pytest
import torch

import ptscale.prefix.attention as attention
from ptscale.prefix.attention import PrefixSlot, PrefixStore, attach, prefix_attention_forward
from tests.prefix.families import explicit_attention


class FakeAttention(torch.nn.Module):
    def __init__(self, causal=False, groups=1):
        super().__init__()
        self.is_causal = causal
        self.num_key_value_groups = groups


def _case(causal=False, lq=6, lk=6, hq=2, hkv=2, p=3, dtype=torch.float64, padding=True):
    torch.manual_seed(0)
    b, d = 2, 8
    q = torch.randn(b, hq, lq, d, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(b, hkv, lk, d, dtype=dtype, requires_grad=True) for _ in range(2))
    kv = torch.randn(1, 2, hkv, p, d, dtype=dtype, requires_grad=True)
    module = FakeAttention(causal, hq // hkv)
    attach(module, PrefixSlot(PrefixStore(active={"t": kv}), "t", 0))
    mask = None
    if padding:
        pad = torch.ones(b, lk, dtype=torch.bool)
        pad[1, -2:] = False
        i = torch.arange(lq)[:, None] + (lk - lq)
        allowed = (torch.arange(lk)[None, :] <= i) if causal else torch.ones(lq, lk, dtype=torch.bool)
        mask = allowed[None, None] & pad[:, None, None, :]
    return module, q, k, v, kv, mask


@pytest.fixture
def fresh_log(monkeypatch):
    monkeypatch.setattr(attention, "_backend_logged", set())


def test_forced_triton_on_cpu_is_a_clear_error(monkeypatch, fresh_log):
    monkeypatch.setenv("PTSCALE_ATTENTION", "triton")
    module, q, k, v, _, mask = _case()
    with pytest.raises(RuntimeError, match=r"PTSCALE_ATTENTION=triton but the Triton prefix kernel cannot run: "
                                           r"tensors on cpu .*PTSCALE_ATTENTION=reference"):
        prefix_attention_forward(module, q, k, v, mask, scaling=0.3)


def test_forced_triton_without_the_kernel_package_is_a_clear_error(monkeypatch, fresh_log):
    monkeypatch.setenv("PTSCALE_ATTENTION", "triton")
    monkeypatch.setitem(sys.modules, "ptscale_kernels", None)  # import fails
    module, q, k, v, _, mask = _case()
    with pytest.raises(RuntimeError, match=r"cannot run: ptscale_kernels/triton not importable"):
        prefix_attention_forward(module, q, k, v, mask, scaling=0.3)


def test_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("PTSCALE_ATTENTION", "flash")
    module, q, k, v, _, mask = _case()
    with pytest.raises(ValueError, match="PTSCALE_ATTENTION='flash': use one of auto, reference, triton"):
        prefix_attention_forward(module, q, k, v, mask, scaling=0.3)


def test_reference_fallback_is_logged_once(monkeypatch, fresh_log, caplog):
    monkeypatch.delenv("PTSCALE_ATTENTION", raising=False)
    module, q, k, v, _, mask = _case()
    with caplog.at_level(logging.INFO, logger="ptscale.prefix.attention"):
        for _ in range(3):
            prefix_attention_forward(module, q, k, v, mask, scaling=0.3)
    messages = [r.getMessage() for r in caplog.records if r.name == "ptscale.prefix.attention"]
    assert messages == ["prefix attention: reference path (concat + SDPA); kernel unused: "
                        "tensors on cpu (the Triton kernel runs on CUDA)"]
    caplog.clear()
    monkeypatch.setenv("PTSCALE_ATTENTION", "reference")  # chosen explicitly: nothing to report
    with caplog.at_level(logging.INFO, logger="ptscale.prefix.attention"):
        prefix_attention_forward(module, q, k, v, mask, scaling=0.3)
    assert not caplog.records


@pytest.fixture
def stand_in_kernel(monkeypatch, fresh_log):
    """A ``ptscale_kernels`` whose ``prefix_attention`` records its arguments and computes the explicit
    reference from them, so the hook's translation (mask -> key_padding_mask, causal, scale) is checked."""
    calls = []

    def prefix_attention(q, k, v, prefix_k, prefix_v, *, key_padding_mask=None, causal=False, scale=None):
        calls.append({"key_padding_mask": key_padding_mask, "causal": causal, "scale": scale})
        b, _, lq, _ = q.shape
        lk = k.shape[2]
        i = torch.arange(lq)[:, None]
        allowed = (torch.arange(lk)[None, :] <= i) if causal else torch.ones(lq, lk, dtype=torch.bool)
        mask = allowed[None, None].expand(b, 1, lq, lk)
        if key_padding_mask is not None:
            mask = mask & key_padding_mask[:, None, None, :]
        module = FakeAttention(False)
        attach(module, PrefixSlot(PrefixStore(active={"t": torch.stack([prefix_k, prefix_v])[None]}), "t", 0))
        return explicit_attention(module, q, k, v, mask, scaling=scale)[0].transpose(1, 2)

    fake = types.ModuleType("ptscale_kernels")
    fake.prefix_attention = prefix_attention
    fake.triton_available = lambda device: True
    monkeypatch.setitem(sys.modules, "ptscale_kernels", fake)
    return calls


@pytest.mark.parametrize("causal", [False, True])
def test_kernel_receives_the_prefix_and_padding(stand_in_kernel, causal, monkeypatch):
    monkeypatch.setenv("PTSCALE_ATTENTION", "triton")
    monkeypatch.setattr(attention, "choose_backend", lambda query, dropout: "triton")  # CUDA-only otherwise
    module, q, k, v, kv, mask = _case(causal=causal)
    out, _ = prefix_attention_forward(module, q, k, v, mask, scaling=0.3)
    (call,) = stand_in_kernel
    assert call["causal"] is causal and call["scale"] == 0.3
    assert torch.equal(call["key_padding_mask"], mask[:, 0, -1, :])
    monkeypatch.setenv("PTSCALE_ATTENTION", "reference")
    ref, _ = prefix_attention_forward(module, q, k, v, mask, scaling=0.3)
    rows = mask[:, 0, :, :].any(-1)
    torch.testing.assert_close(out[rows], ref[rows], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case, why", [
    (dict(causal=True, lq=1, lk=6), "decoding with a KV cache"),
    (dict(hq=4, hkv=2), "grouped-query attention"),
])
def test_cases_outside_the_kernel_use_the_reference_and_say_so(stand_in_kernel, monkeypatch, caplog, case, why):
    monkeypatch.setenv("PTSCALE_ATTENTION", "triton")
    module, q, k, v, kv, mask = _case(**case)
    with caplog.at_level(logging.INFO, logger="ptscale.prefix.attention"):
        out, _ = prefix_attention_forward(module, q, k, v, mask, scaling=0.3)
        prefix_attention_forward(module, q, k, v, mask, scaling=0.3)
    assert not stand_in_kernel
    assert [r.getMessage() for r in caplog.records] == [
        f"prefix attention: reference path for {why} (the Triton kernel does not cover it)"]
    ref, _ = explicit_attention(module, q, k, v, mask, scaling=0.3)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_position_bias_covers_sequence_keys_only_float64(causal):
    """T5: the relative-position bias is added to sequence scores; prefix keys (no position) get none."""
    module, q, k, v, kv, mask = _case(causal=causal)
    bias = torch.randn(1, q.shape[1], q.shape[2], k.shape[2], dtype=torch.float64, requires_grad=True)
    out, _ = prefix_attention_forward(module, q, k, v, mask, scaling=1.0, position_bias=bias)
    ref, _ = explicit_attention(module, q, k, v, mask, scaling=1.0, position_bias=bias)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    inputs = (q, k, v, kv, bias)
    for a, r in zip(torch.autograd.grad((out * g).sum(), inputs), torch.autograd.grad((ref * g).sum(), inputs),
                    strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
    no_bias, _ = prefix_attention_forward(module, q, k, v, mask, scaling=1.0)
    assert (no_bias - out).abs().max() > 1e-3


def test_softcap_is_refused():
    module, q, k, v, _, mask = _case()
    with pytest.raises(ValueError, match="soft-capping"):
        prefix_attention_forward(module, q, k, v, mask, scaling=0.3, softcap=30.0)
