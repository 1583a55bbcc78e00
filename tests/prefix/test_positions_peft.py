"""prefix.positions (keep | shift) against HF PEFT's prefix tuning, and LM prefixes to / from PEFT adapters.

PEFT is the reference for ``shift``: same prefix keys/values, its own cache-based injection, its own position
numbering (real tokens P..P+L-1). ``keep`` is checked against PEFT given position ids that undo its offset.
Models run in float64 so that the two attention paths (concatenated prefix vs pre-filled cache) agree to
rounding: 1e-10 leaves room for summation order only; any convention mismatch is >= 1e-3 here.
"""

import copy

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model

from ptscale.config import PrefixConfig
from ptscale.prefix.model import PrefixTunedModel
from ptscale.prefix.peft_interop import (
    PeftPrefixError,
    export_prefix_peft,
    load_peft_prefix,
    prefixed_from_peft,
    read_peft_prefix,
)
from tests.prefix.families import build, make_batch

FAMILIES = ("opt", "llama", "qwen2")
P = 3
TOL = dict(rtol=0, atol=1e-10)


def _model(family, positions):
    base = build(family, dtype=torch.float64)
    pristine = copy.deepcopy(base)
    model = PrefixTunedModel(base, PrefixConfig(lengths={"language_model": P}, encoder_hidden=8, init_std=0.5,
                                                positions=positions)).double().eval()
    model.fold_prefixes()
    with torch.no_grad():  # PEFT's prompt encoder holds fp32 weights: give it fp32-exact values
        model.prefixes["language_model"].kv.copy_(model.prefixes["language_model"].kv.float().double())
    return model, pristine


def _inputs(family):
    batch = make_batch(family)  # left padding in row 1
    batch.pop("labels")
    return batch


def _keep_positions(family, mask):
    """The real tokens' position ids without a prefix, as each family numbers them."""
    if family == "opt":
        return torch.cumsum(mask, 1) * mask - 1
    return torch.arange(mask.shape[1])[None].expand_as(mask)


@pytest.mark.parametrize("family", FAMILIES)
def test_shift_equals_peft_and_keep_equals_peft_with_unshifted_positions(family, tmp_path):
    shift, pristine = _model(family, "shift")
    export_prefix_peft(shift, tmp_path)
    peft = PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path)).eval()
    batch = _inputs(family)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        ours = shift(**batch).logits
        theirs = peft(**batch).logits
        torch.testing.assert_close(ours[real], theirs[real], **TOL)
        shift.positions = "keep"
        kept = shift(**batch).logits
        # PEFT adds P to given position ids: pass keep - P to number the real tokens 0..L-1
        pos = _keep_positions(family, batch["attention_mask"]) - P
        torch.testing.assert_close(kept[real], peft(**batch, position_ids=pos).logits[real], **TOL)
    assert (kept[real] - ours[real]).abs().max() > 1e-4  # the two conventions are different models


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_beams", [1, 3])
def test_shift_generates_what_peft_generates(family, num_beams, tmp_path):
    model, pristine = _model(family, "shift")
    export_prefix_peft(model, tmp_path)
    peft = PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path)).eval()
    batch = _inputs(family)
    kw = dict(max_new_tokens=6, do_sample=False, num_beams=num_beams)
    assert torch.equal(model.generate(**batch, **kw), peft.generate(**batch, **kw))


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_match_peft(family):
    """Training the raw prefix (encoder none) is training PEFT's prefix: same loss, same prefix gradient."""
    base = build(family, dtype=torch.float64)
    pristine = copy.deepcopy(base)
    model = PrefixTunedModel(base, PrefixConfig(lengths={"language_model": P}, encoder="none", init_std=0.5)).double()
    peft = get_peft_model(copy.deepcopy(pristine), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    peft.double()
    kv = model.prefixes["language_model"].kv  # (layers, 2, H, P, D)
    with torch.no_grad():
        peft.prompt_encoder["default"].embedding.weight.copy_(kv.permute(3, 0, 1, 2, 4).reshape(P, -1))
    batch = make_batch(family)
    ours, theirs = model(**batch).loss, peft(**batch).loss
    torch.testing.assert_close(ours, theirs, **TOL)
    ours.backward()
    theirs.backward()
    grad = peft.prompt_encoder["default"].embedding.weight.grad
    torch.testing.assert_close(kv.grad.permute(3, 0, 1, 2, 4).reshape(P, -1), grad, **TOL)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("projection", [False, True])
def test_import_peft_adapter(family, projection, tmp_path):
    """A prefix trained by PEFT (random, with or without its MLP projection) and saved by PEFT itself."""
    pristine = build(family, dtype=torch.float64)
    torch.manual_seed(3)
    peft = get_peft_model(copy.deepcopy(pristine), PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection, encoder_hidden_size=8))
    peft.double().eval()
    with torch.no_grad():
        for p in peft.prompt_encoder.parameters():
            p.normal_(0, 0.5)
    peft.save_pretrained(str(tmp_path))
    batch = _inputs(family)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        theirs = peft(**batch).logits
        pos = _keep_positions(family, batch["attention_mask"]) - P
        theirs_keep = peft(**batch, position_ids=pos).logits
        for positions, expected in (("shift", theirs), ("keep", theirs_keep)):
            ours = prefixed_from_peft(copy.deepcopy(pristine), tmp_path, positions=positions).double().eval()
            torch.testing.assert_close(ours(**batch).logits[real], expected[real], **TOL)


def test_import_initialises_a_trainable_raw_prefix_and_refuses_an_encoder(tmp_path):
    model, _ = _model("opt", "shift")
    export_prefix_peft(model, tmp_path)
    kv = read_peft_prefix(tmp_path)
    raw = PrefixTunedModel(build("opt"), PrefixConfig(lengths={"language_model": P}, encoder="none"))
    load_peft_prefix(raw, tmp_path)  # initialisation: the raw keys/values are the trained parameters
    assert raw.prefixes["language_model"].kv.requires_grad
    torch.testing.assert_close(raw.prefixes["language_model"].kv, kv.float(), rtol=0, atol=0)
    mlp = PrefixTunedModel(build("opt"), PrefixConfig(lengths={"language_model": P}))
    with pytest.raises(PeftPrefixError, match="fold_prefixes"):
        load_peft_prefix(mlp, tmp_path)
    wrong = PrefixTunedModel(build("opt"), PrefixConfig(lengths={"language_model": P + 1}, encoder="none"))
    with pytest.raises(PeftPrefixError, match="shape"):
        load_peft_prefix(wrong, tmp_path)


def test_blip2_language_model_prefix_through_peft(tmp_path):
    """BLIP-2's LM prefix as a PEFT adapter on its language_model: the same forward (PEFT cannot prefix-tune the
    whole BLIP-2 model, and its generate() cannot start from inputs_embeds, see the manifest)."""
    base = build("blip2-opt", dtype=torch.float64)
    pristine = copy.deepcopy(base)
    model = PrefixTunedModel(base, PrefixConfig(lengths={"language_model": P}, encoder_hidden=8,
                                                init_std=0.5)).double().eval()
    model.fold_prefixes()
    with torch.no_grad():  # fp32-exact, as PEFT's prompt encoder holds fp32 weights
        model.prefixes["language_model"].kv.copy_(model.prefixes["language_model"].kv.float().double())
    export_prefix_peft(model, tmp_path)
    batch = make_batch("blip2-opt", dtype=torch.float64)
    batch.pop("labels")
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        ours = model(**batch).logits
        other = copy.deepcopy(pristine).eval()
        other.language_model = PeftModel.from_pretrained(other.language_model, str(tmp_path)).eval()
        torch.testing.assert_close(other(**batch).logits[real], ours[real], **TOL)
        back = prefixed_from_peft(copy.deepcopy(pristine), tmp_path).double().eval()
        torch.testing.assert_close(back(**batch).logits, ours, **TOL)


def test_prefixes_disabled_means_no_shift():
    model, pristine = _model("opt", "shift")
    batch = _inputs("opt")
    with torch.no_grad(), model.prefixes_disabled():
        torch.testing.assert_close(model(**batch).logits, pristine(**batch).logits, rtol=0, atol=0)


def test_base_is_frozen_by_default():
    model = PrefixTunedModel(build("opt"), PrefixConfig(lengths={"language_model": P}))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("prefixes.") for n in trainable)
    opted_out = PrefixTunedModel(build("opt"), PrefixConfig(lengths={"language_model": P}), freeze_base=False)
    assert all(p.requires_grad for p in opted_out.base.parameters())
