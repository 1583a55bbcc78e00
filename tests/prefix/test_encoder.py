"""The prefix encoder and its table-10 ablations, folding, and saving/loading through safetensors."""

import pytest
import torch
from safetensors.torch import save_file

from ptscale.config import PrefixConfig
from ptscale.prefix.encoder import FoldedPrefix, PrefixEncoder, PrefixShape
from ptscale.prefix.model import PrefixTunedModel
from ptscale.prefix.plus import PlusPrefix
from ptscale.prefix.saving import load_prefixes, save_prefixes
from tests.prefix.families import LENGTHS, build, make_batch

SHAPE = PrefixShape(num_layers=3, num_heads=2, head_dim=4, length=5)


@pytest.mark.parametrize("encoder, type_embedding, names", [
    ("mlp", True, {"embedding", "type_embedding", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"}),
    ("mlp", False, {"embedding", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"}),
    ("linear", True, {"embedding", "type_embedding", "proj.weight", "proj.bias"}),
    ("linear", False, {"embedding", "proj.weight", "proj.bias"}),
    ("none", True, {"kv"}),
])
def test_encoder_variants(encoder, type_embedding, names):
    torch.manual_seed(0)
    enc = PrefixEncoder(SHAPE, encoder=encoder, hidden=7, type_embedding=type_embedding, init_std=0.3)
    with torch.no_grad():
        if type_embedding and encoder != "none":
            enc.type_embedding.normal_()  # zero-initialised; make it matter
    assert {n for n, _ in enc.named_parameters()} == names
    out = enc()
    assert out.shape == SHAPE.kv_shape
    # Layout: row p of the projection holds layer l, K/V c, head h, dim d at ((l*2 + c)*H + h)*D + d.
    if encoder == "none":
        expected = enc.kv
        assert out.data_ptr() != enc.kv.data_ptr()  # a copy (ZeRO-3 releases the parameter after the call)
    else:
        x = enc.embedding + (enc.type_embedding if type_embedding else 0)
        flat = enc.proj(x) if encoder == "linear" else enc.mlp[2](torch.tanh(enc.mlp[0](x)))
        expected = torch.empty(SHAPE.kv_shape)
        for layer, c, h, p, d in torch.cartesian_prod(*(torch.arange(n) for n in SHAPE.kv_shape)).tolist():
            expected[layer, c, h, p, d] = flat[p, ((layer * 2 + c) * SHAPE.num_heads + h) * SHAPE.head_dim + d]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)
    grads = torch.autograd.grad((out * torch.randn_like(out)).sum(), list(enc.parameters()))
    assert all(g.abs().sum() > 0 for g in grads)


def test_unknown_encoder_is_an_error():
    with pytest.raises(ValueError, match="prefix.encoder: unknown kind 'conv'"):
        PrefixEncoder(SHAPE, encoder="conv")


def _model(encoder="mlp", kind="classic", seed=0, family="blip2-opt", dtype=torch.float32, **cfg):
    base = build(family, seed=0, dtype=dtype)  # the same base model every time
    torch.manual_seed(seed)  # prefixes differ by seed
    model = PrefixTunedModel(base, PrefixConfig(lengths=LENGTHS[family], encoder=encoder, kind=kind,
                                                encoder_hidden=8, init_std=0.5, **cfg)).to(dtype)
    if kind == "plus":
        with torch.no_grad():
            for m in model.prefixes.values():
                m.gate.uniform_(0.5, 1.5)
    with torch.no_grad():  # zero-initialised type embeddings: make them matter
        for name, p in model.prefixes.named_parameters():
            if name.endswith("type_embedding"):
                p.normal_()
    return model


@pytest.mark.parametrize("kind", ["classic", "plus"])
@pytest.mark.parametrize("encoder", ["mlp", "linear", "none"])
def test_folded_equals_unfolded(encoder, kind):
    model = _model(encoder, kind)
    batch = make_batch("blip2-opt")
    with torch.no_grad():
        before = model(**batch).logits
        outputs = {t: m() for t, m in model.prefixes.items()}
    model.fold_prefixes()
    assert all(model.folded().values())
    for target, module in model.prefixes.items():
        folded = module.source if kind == "plus" else module
        assert isinstance(folded, FoldedPrefix)
        expected = outputs[target][0] if kind == "plus" else outputs[target]
        assert torch.equal(folded.kv, expected) and folded.kv.requires_grad
        names = {n for n, _ in module.named_parameters()}
        assert names == ({"source.kv", "gate"} if kind == "plus" else {"kv"})
    with torch.no_grad():
        after = model(**batch).logits
    assert torch.equal(before, after)
    model.fold_prefixes()  # idempotent
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, after)


def _prefix_state(model):
    return {n: p.detach().clone() for n, p in model.prefixes.named_parameters()}


@pytest.mark.parametrize("kind", ["classic", "plus"])
@pytest.mark.parametrize("fold", [False, True])
def test_save_load_round_trip(tmp_path, fold, kind):
    source, target = _model(kind=kind, seed=0), _model(kind=kind, seed=1)
    if fold:
        source.fold_prefixes()
        target.fold_prefixes()
    before = _prefix_state(target)
    assert any(not torch.equal(a, before[n]) for n, a in _prefix_state(source).items())
    path = tmp_path / "prefixes.safetensors"
    save_prefixes(source, path)
    load_prefixes(target, path)
    saved, loaded = _prefix_state(source), _prefix_state(target)
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[n], loaded[n]) for n in saved)
    batch = make_batch("blip2-opt")
    with torch.no_grad():
        assert torch.equal(source(**batch).logits, target(**batch).logits)


def test_unfolded_file_then_fold_equals_folded_file(tmp_path):
    source = _model(seed=0)
    save_prefixes(source, tmp_path / "unfolded.safetensors")
    source.fold_prefixes()
    save_prefixes(source, tmp_path / "folded.safetensors")
    a, b = _model(seed=1), _model(seed=2)
    load_prefixes(a, tmp_path / "unfolded.safetensors")
    a.fold_prefixes()
    b.fold_prefixes()
    load_prefixes(b, tmp_path / "folded.safetensors")
    state_a, state_b = _prefix_state(a), _prefix_state(b)
    assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[n], state_b[n]) for n in state_a)


def test_load_mismatches_are_clear_errors(tmp_path):
    folded, unfolded = _model(seed=0), _model(seed=0)
    folded.fold_prefixes()
    save_prefixes(folded, tmp_path / "folded.safetensors")
    save_prefixes(unfolded, tmp_path / "unfolded.safetensors")
    before = _prefix_state(unfolded)
    with pytest.raises(ValueError, match=r"prefix 'language_model' is folded \(static keys/values\) in the file but "
                                         r"unfolded \(encoder weights\) in the model; call model.fold_prefixes\(\)"):
        load_prefixes(unfolded, tmp_path / "folded.safetensors")
    with pytest.raises(ValueError, match=r"is unfolded \(encoder weights\) in the file but folded .* load into an "
                                         "unfolded model, then fold"):
        load_prefixes(folded, tmp_path / "unfolded.safetensors")
    with pytest.raises(ValueError, match="holds 'classic' prefixes, the model has 'plus'"):
        load_prefixes(_model(kind="plus"), tmp_path / "unfolded.safetensors")
    with pytest.raises(ValueError, match=r"parameters missing from the file \['prefixes.language_model.proj.bias'"):
        load_prefixes(_model(encoder="linear"), tmp_path / "unfolded.safetensors")
    with pytest.raises(ValueError, match=r"prefix 'qformer' has shape \[2, 2, 2, 2, 8\] .* \[2, 2, 2, 5, 8\]"):
        load_prefixes(_longer_qformer(), tmp_path / "unfolded.safetensors")
    with pytest.raises(ValueError, match=r"prefix targets \['language_model', 'qformer', 'vision'\] do not match "
                                         r"the model's \['language_model'\]"):
        only_lm = PrefixTunedModel(build("blip2-opt"), PrefixConfig(lengths={"language_model": 3}, encoder_hidden=8))
        load_prefixes(only_lm, tmp_path / "unfolded.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a ptscale prefix file"):
        load_prefixes(unfolded, tmp_path / "other.safetensors")
    after = _prefix_state(unfolded)
    assert all(torch.equal(before[n], after[n]) for n in before)  # a failed load writes nothing


def _longer_qformer():
    lengths = dict(LENGTHS["blip2-opt"], qformer=5)
    return PrefixTunedModel(build("blip2-opt"), PrefixConfig(lengths=lengths, encoder_hidden=8))


def test_plus_module_holds_its_encoder_and_gate():
    model = _model(kind="plus")
    module = model.prefixes["language_model"]
    assert isinstance(module, PlusPrefix) and isinstance(module.source, PrefixEncoder)
    assert all(n.startswith("prefixes.") for n, _ in model.named_parameters() if not n.startswith("base."))
    assert module.gate.shape == (2, 4)  # (layers, query heads)
