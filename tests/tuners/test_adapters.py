"""Sequential / parallel adapters on the tiny BLIP-2: placement, zero start, exact forward formulas, parameter
counts and budgets, gradient flow, config errors."""

import copy
import re

import pytest
import torch

from ptscale.config import LoraConfig, PrefixConfig, RecipeError
from ptscale.models.groups import group_of
from ptscale.prefix.model import PrefixTunedModel
from ptscale.tuners.adapter import (
    ADAPTER_PARAM_PATTERN,
    AdapterConfig,
    ParallelAdapterLinear,
    SequentialAdapterLinear,
    adapter_param_count,
    bottleneck_for_budget,
    has_adapters,
    inject_adapters,
)
from ptscale.tuners.lora import inject_lora

ALL = ["vision", "qformer", "language_model"]
QKV = ["attention.attention.query", "attention.attention.key", "attention.attention.value"]


def _batch(model):
    torch.manual_seed(1)
    q, img = model.config.num_query_tokens, model.config.image_token_id
    ids = torch.tensor([[img] * q + [2, 7, 8, 9, 10], [img] * q + [2, 7, 8, 1, 1]])
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    return {"pixel_values": torch.randn(2, 3, 32, 32), "input_ids": ids, "attention_mask": mask}


def _wrapped(base):
    return PrefixTunedModel(base, PrefixConfig(lengths={"qformer": 2, "language_model": 2}, encoder_hidden=8))


def _randomize_up(model, std=0.1):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".ptscale_adapter.up." in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("kind, act", [("sequential", "relu"), ("parallel", "gelu")])
def test_injected_adapter_leaves_outputs_exactly_unchanged(tiny_backbone, kind, act):
    base, _, _ = tiny_backbone
    model = _wrapped(base)
    batch = _batch(base)
    with torch.no_grad():
        before = model(**batch).logits
    inj = inject_adapters(model, AdapterConfig(kind=kind, components=ALL, bottleneck=4, nonlinearity=act))
    with torch.no_grad():
        after = model(**batch).logits
        assert torch.equal(after, before)
        _randomize_up(model)  # the equality above is the zero start, not a dead adapter
        assert not torch.allclose(model(**batch).logits, before)
    assert inj.bottleneck == 4 and has_adapters(model)


def test_sites_names_and_groups(tiny_backbone):
    base, _, _ = tiny_backbone
    model = _wrapped(base)
    groups_before = {n: group_of(n) for n, _ in model.named_parameters()}
    inj = inject_adapters(model, AdapterConfig(kind="sequential", components=ALL, bottleneck=3))
    suffixes = {re.sub(r"\.\d+\.", ".N.", n) for n in inj.modules}
    assert suffixes == {
        "base.vision_model.encoder.layers.N.self_attn.projection", "base.vision_model.encoder.layers.N.mlp.fc2",
        "base.qformer.encoder.layer.N.attention.output.dense", "base.qformer.encoder.layer.N.output_query.dense",
        "base.language_model.model.decoder.layers.N.self_attn.out_proj",
        "base.language_model.model.decoder.layers.N.fc2",
    }
    assert len(inj.modules) == 2 * 3 * 2  # 2 sites per layer, 3 components, 2 layers each
    assert all(isinstance(model.get_submodule(n), SequentialAdapterLinear) for n in inj.modules)
    assert not any("crossattention" in n for n in inj.modules)

    names = [n for n, _ in model.named_parameters()]
    adapter = [n for n in names if ".ptscale_adapter." in n]
    assert len(adapter) == 4 * len(inj.modules)  # down/up weight/bias
    assert all(re.search(ADAPTER_PARAM_PATTERN, n) for n in adapter)
    # the wrapped Linears keep their group; nothing else was renamed
    others = {n.replace(".base_layer.", "."): n for n in names if n not in adapter}
    assert set(others) == set(groups_before)
    assert all(group_of(new) == groups_before[old] for old, new in others.items())
    assert {group_of(n) for n in adapter} == {"adapter"}
    with pytest.raises(ValueError, match="already has an adapter"):
        inject_adapters(model, AdapterConfig(kind="sequential", components=["qformer"], bottleneck=3))


def test_parallel_sites(tiny_backbone):
    base, _, _ = tiny_backbone
    model = _wrapped(base)
    inj = inject_adapters(model, AdapterConfig(kind="parallel", components=ALL, bottleneck=3))
    assert len(inj.modules) == 3 * 2  # one beside each FFN
    assert {n.rsplit(".", 1)[-1] for n in inj.modules} == {"fc2", "dense"}
    assert all(".output_query.dense" in n for n in inj.modules if ".qformer." in n)
    assert all(isinstance(model.get_submodule(n), ParallelAdapterLinear) for n in inj.modules)
    # the FFN input Linear is hooked, not renamed
    assert isinstance(model.base.language_model.model.decoder.layers[0].fc1, torch.nn.Linear)


def test_forward_formulas(tiny_backbone):
    """Sequential: base(x) + s*A(base(x)); parallel: FFN(x) + s*A(x) with x the FFN input."""
    base, _, _ = tiny_backbone
    mlp_ref = copy.deepcopy(base.vision_model.encoder.layers[0].mlp)
    out_proj_ref = copy.deepcopy(base.language_model.model.decoder.layers[1].self_attn.out_proj)
    par, seq = copy.deepcopy(base), base
    inject_adapters(par, AdapterConfig(kind="parallel", components=["vision"], bottleneck=5, scale=2.0))
    inject_adapters(seq, AdapterConfig(kind="sequential", components=["language_model"], bottleneck=5, scale=0.5))
    _randomize_up(par)
    _randomize_up(seq)
    x = torch.randn(3, 7, 64)
    mlp = par.vision_model.encoder.layers[0].mlp
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), mlp_ref(x) + 2.0 * mlp.fc2.ptscale_adapter(x))
        wrapper = seq.language_model.model.decoder.layers[1].self_attn.out_proj
        h = torch.randn(4, 128)
        y = out_proj_ref(h)
        torch.testing.assert_close(wrapper(h), y + 0.5 * wrapper.ptscale_adapter(y))
        with pytest.raises(RuntimeError, match="without its FFN input Linear"):
            mlp.fc2(torch.randn(3, 7, 128))  # fc2 alone: no FFN input was captured


@pytest.mark.parametrize("kind", ["sequential", "parallel"])
def test_param_count_and_budget(tiny_backbone, kind):
    base, _, _ = tiny_backbone
    model = _wrapped(base)
    lora_model = _wrapped(copy.deepcopy(base))
    inject_lora(lora_model, LoraConfig(targets={"qformer": QKV}))
    lora_params = sum(p.numel() for n, p in lora_model.named_parameters() if ".lora_" in n)

    comps = ["qformer", "language_model"]
    b = bottleneck_for_budget(model, comps, kind, lora_params)

    def err(k):
        return abs(adapter_param_count(model, comps, kind, k) - lora_params)

    assert b >= 1 and err(b) <= err(b + 1) and (b == 1 or err(b) <= err(b - 1))
    assert bottleneck_for_budget(model, comps, kind, adapter_param_count(model, comps, kind, 7)) == 7
    assert bottleneck_for_budget(model, comps, kind, 1) == 1  # below the smallest adapter: the smallest

    inj = inject_adapters(model, AdapterConfig(kind=kind, components=comps, budget=lora_params))
    actual = sum(p.numel() for n, p in model.named_parameters() if ".ptscale_adapter." in n)
    assert inj.bottleneck == b and inj.num_params == actual == adapter_param_count(model, comps, kind, b)


@pytest.mark.parametrize("kind", ["sequential", "parallel"])
def test_training_changes_only_adapters(tiny_backbone, kind):
    base, _, _ = tiny_backbone
    with torch.no_grad():  # a fresh tiny BLIP-2's vision weights have std 1e-10 (its initializer_range), which
        for p in base.vision_model.parameters():  # makes vision gradients ~1e-22: give them a usual scale
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
    model = _wrapped(base)
    # gelu: with a small bottleneck a ReLU adapter can start with every unit dead (zero gradient, legitimately)
    inject_adapters(model, AdapterConfig(kind=kind, components=ALL, bottleneck=8, nonlinearity="gelu", dropout=0.1))
    model.train()
    for n, p in model.named_parameters():
        p.requires_grad_(".ptscale_adapter." in n)
    adapter = {n: p for n, p in model.named_parameters() if ".ptscale_adapter." in n}
    batch = _batch(base)

    # at the zero start only up gets a gradient (down's is up^T @ ..., zero while up is 0)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    for n, p in adapter.items():
        assert (p.grad.abs().sum() > 0) == (".up." in n), n
    # as after some training (up != 0): every adapter parameter gets a gradient, the parallel adapter's down
    # through the captured FFN input; nothing else gets one
    _randomize_up(model)
    model.zero_grad()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(p.grad.abs().sum() > 0 for p in adapter.values())
    assert all(p.grad is None for n, p in model.named_parameters() if n not in adapter)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.optim.AdamW(adapter.values(), lr=1e-2, weight_decay=0.0).step()
    for n, p in model.named_parameters():
        assert (not torch.equal(p, before[n])) == (n in adapter), n


def test_config_errors():
    with pytest.raises(RecipeError, match=r"adapter.bottleneck / adapter.budget: give exactly one \(got neither\)"):
        AdapterConfig(kind="sequential", components=["qformer"])
    with pytest.raises(RecipeError, match=r"\(got both\)"):
        AdapterConfig(components=["qformer"], bottleneck=8, budget=1000)
    with pytest.raises(RecipeError, match="adapter.components: unknown component 'text'"):
        AdapterConfig(components=["text"], bottleneck=8)
    with pytest.raises(RecipeError, match="adapter.components: empty"):
        AdapterConfig(components=[], bottleneck=8)
    with pytest.raises(RecipeError, match="adapter.kind: 'series'"):
        AdapterConfig(kind="series", bottleneck=8)
    with pytest.raises(RecipeError, match="adapter.bottleneck: must be > 0"):
        AdapterConfig(bottleneck=0)
    with pytest.raises(RecipeError, match="adapter.nonlinearity"):
        AdapterConfig(bottleneck=8, nonlinearity="tanh")
    with pytest.raises(RecipeError, match="adapter.dropout"):
        AdapterConfig(bottleneck=8, dropout=1.0)


def test_parallel_adapter_under_gradient_checkpointing(tiny_backbone):
    """Recomputation re-runs the FFN input Linear, so the captured input is the recomputed one: same
    gradients as without checkpointing."""
    base, _, _ = tiny_backbone
    model = _wrapped(base)
    inject_adapters(model, AdapterConfig(kind="parallel", components=["qformer", "language_model"], bottleneck=4,
                                         nonlinearity="gelu"))
    _randomize_up(model)
    model.train()
    for n, p in model.named_parameters():
        p.requires_grad_(".ptscale_adapter." in n)
    batch = _batch(base)

    def grads():
        model.zero_grad()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fc1 = base.language_model.model.decoder.layers[0].fc1
    calls = []
    fc1.register_forward_hook(lambda *_: calls.append(1))
    plain = grads()
    assert len(calls) == 1
    base.activation_checkpointing_enable()
    checkpointed = grads()
    assert len(calls) == 3  # forward + recomputation in backward
    assert plain.keys() == checkpointed.keys() and len(plain) == 4 * 4
    for n, g in plain.items():
        torch.testing.assert_close(checkpointed[n], g, msg=n)
