"""Prefix-Tuning+ (prefix.kind: plus): the memory term against its formula written out per head in float64
(forward and gradients, every feature map, grouped-query heads), the hook's plus path against the model's
own attention plus that term, and the zero gate that leaves a fresh plus-prefix without effect."""

import copy

import pytest
import torch

from ptscale.config import PrefixConfig
from ptscale.prefix.attention import PrefixSlot, PrefixStore, attach, prefix_attention_forward
from ptscale.prefix.model import PrefixTunedModel
from ptscale.prefix.plus import PlusLayer, PlusState, memory_term
from tests.prefix.families import LENGTHS, build, explicit_attention, explicit_plus, make_batch


@pytest.mark.parametrize("feature_map", ["elu1", "relu", "identity"])
@pytest.mark.parametrize("hq, hkv", [(4, 4), (4, 2)])
def test_memory_term_equals_formula_float64(feature_map, hq, hkv):
    torch.manual_seed(0)
    b, length, d, p = 2, 5, 8, 3
    q = torch.randn(b, hq, length, d, dtype=torch.float64, requires_grad=True)
    keys, values = (torch.randn(hkv, p, d, dtype=torch.float64, requires_grad=True) for _ in range(2))
    gate = torch.randn(hq, dtype=torch.float64, requires_grad=True)
    scale = d ** -0.5
    out = memory_term(q, PlusLayer(keys, values, gate, feature_map), scale)
    ref = explicit_plus(q, keys, values, gate, feature_map, scale)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad((out * g).sum(), (q, keys, values, gate))
    grads_ref = torch.autograd.grad((ref * g).sum(), (q, keys, values, gate))
    for a, r in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
    assert out.abs().max() > 0


def test_memory_term_is_not_diluted_by_sequence_length():
    """Each query's term depends on that query alone: adding sequence positions does not change it."""
    torch.manual_seed(0)
    q = torch.randn(1, 2, 6, 4, dtype=torch.float64)
    mem = PlusLayer(torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64),
                    torch.ones(2, dtype=torch.float64), "elu1")
    torch.testing.assert_close(memory_term(q, mem, 0.5)[:, :, :2], memory_term(q[:, :, :2], mem, 0.5))


class FakeAttention(torch.nn.Module):
    def __init__(self, causal):
        super().__init__()
        self.is_causal = causal


@pytest.mark.parametrize("causal", [False, True])
def test_hook_plus_path_equals_explicit_float64(causal):
    torch.manual_seed(0)
    b, hq, hkv, lq, d, p = 3, 4, 2, 6, 8, 5
    q = torch.randn(b, hq, lq, d, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(b, hkv, lq, d, dtype=torch.float64, requires_grad=True) for _ in range(2))
    kv = torch.randn(1, 2, hkv, p, d, dtype=torch.float64, requires_grad=True)
    gate = torch.randn(1, hq, dtype=torch.float64, requires_grad=True)
    pad = torch.ones(b, lq, dtype=torch.bool)
    pad[1, -2:] = False
    base = torch.tril(torch.ones(lq, lq, dtype=torch.bool)) if causal else torch.ones(lq, lq, dtype=torch.bool)
    mask = base[None, None] & pad[:, None, None, :]
    module = FakeAttention(causal)
    module.num_key_value_groups = hq // hkv
    attach(module, PrefixSlot(PrefixStore(active={"t": PlusState(kv, gate, "elu1")}), "t", 0))
    out, _ = prefix_attention_forward(module, q, k, v, mask, scaling=d ** -0.5)
    ref, _ = explicit_attention(module, q, k, v, mask, scaling=d ** -0.5)
    rows = pad if causal else torch.ones_like(pad)  # rows that see at least one sequence key
    torch.testing.assert_close(out[rows], ref[rows], rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad((out[rows] * g[rows]).sum(), (q, k, v, kv, gate))
    grads_ref = torch.autograd.grad((ref[rows] * g[rows]).sum(), (q, k, v, kv, gate))
    for a, r in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("family", ["blip2-opt", "llama", "t5"])
def test_fresh_plus_prefix_is_the_base_model(family):
    base = build(family)
    reference = copy.deepcopy(base)
    # freeze_base=False: the reference runs with autograd on its weights, so this one must too (same kernels)
    model = PrefixTunedModel(base, PrefixConfig(lengths=LENGTHS[family], kind="plus", encoder_hidden=8,
                                                init_std=0.5), freeze_base=False)
    batch = make_batch(family)
    out = model(**batch)
    assert torch.equal(out.logits, reference(**batch).logits)  # both with autograd on (same SDPA kernels)
    # The first step moves the gates only: the memory's gradient is proportional to the gate.
    params = dict(model.prefixes.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(out.loss, list(params.values())), strict=True))
    assert all(grads[n].abs().sum() > 0 for n in params if n.endswith("gate"))
    assert all(grads[n].abs().sum() == 0 for n in params if not n.endswith("gate"))
    with torch.no_grad():
        model.prefixes[next(iter(model.prefixes))].gate.fill_(1.0)
        assert not torch.allclose(model(**batch).logits, out.logits)


@pytest.mark.parametrize("feature_map", ["relu", "identity"])
def test_feature_map_is_configurable(feature_map):
    model = PrefixTunedModel(build("opt"), PrefixConfig(lengths={"language_model": 2}, kind="plus",
                                                        feature_map=feature_map))
    assert model.prefixes["language_model"].feature_map == feature_map
    with pytest.raises(ValueError, match="prefix.feature_map: unknown 'softmax'"):
        PrefixTunedModel(build("opt"), PrefixConfig(lengths={"language_model": 2}, kind="plus",
                                                    feature_map="softmax"))


def test_memory_term_keeps_the_query_dtype_and_computes_in_fp32():
    torch.manual_seed(0)
    q = torch.randn(2, 2, 5, 8, dtype=torch.float64)
    mem = PlusLayer(torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.ones(2), "elu1")  # fp32 parameters
    out = memory_term(q.to(torch.bfloat16), mem, 0.3)
    assert out.dtype == torch.bfloat16
    exact = explicit_plus(q.to(torch.bfloat16).double(), mem.keys.double(), mem.values.double(), mem.gate.double(),
                          "elu1", 0.3)
    torch.testing.assert_close(out.double(), exact.to(torch.bfloat16).double(), rtol=0, atol=1e-2)
