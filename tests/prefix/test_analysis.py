"""Table-5 analysis switches, without retraining: prefixes removed (= the base model) and prefixes replaced
by random noise of matched norm (per target, layer and K/V)."""

import copy

import pytest
import torch

from ptscale.config import PrefixConfig
from ptscale.prefix.model import PrefixTunedModel
from ptscale.prefix.plus import PlusState
from tests.prefix.families import LENGTHS, build, make_batch


def _pair(family, kind):
    base = build(family)
    plain = copy.deepcopy(base)
    model = PrefixTunedModel(base, PrefixConfig(lengths=LENGTHS[family], kind=kind, encoder_hidden=8, init_std=0.5))
    if kind == "plus":
        with torch.no_grad():
            for m in model.prefixes.values():
                m.gate.uniform_(0.5, 1.5)
    return model, plain


@pytest.mark.parametrize("kind", ["classic", "plus"])
@pytest.mark.parametrize("family", ["blip2-opt", "qwen2", "t5"])
def test_removed_is_the_base_model_and_noise_has_matched_norms(family, kind):
    model, plain = _pair(family, kind)
    batch = make_batch(family)
    with torch.no_grad():
        trained = model(**batch).logits
        learned = dict(model._store.active)
        with model.prefixes_disabled():
            removed = model(**batch).logits
        with model.prefixes_replaced_by_noise(seed=7):
            noisy = model(**batch).logits
            noise = dict(model._store.active)
        with model.prefixes_replaced_by_noise(seed=7):
            noisy_again = model(**batch).logits
        with model.prefixes_replaced_by_noise(seed=8):
            other_noise = model(**batch).logits
        back = model(**batch).logits
        base = plain(**batch).logits
    assert torch.equal(removed, base)
    assert torch.equal(noisy, noisy_again) and not torch.equal(noisy, other_noise)
    assert torch.equal(back, trained)
    for reference in (trained, base):
        assert (noisy - reference).abs().max() > 1e-3
    assert set(noise) == set(LENGTHS[family])
    for target in noise:
        kv, kv_learned = noise[target], learned[target]
        if kind == "plus":
            assert isinstance(kv, PlusState) and torch.equal(kv.gate, kv_learned.gate)  # trained gates kept
            kv, kv_learned = kv.kv, kv_learned.kv
        assert kv.shape == kv_learned.shape
        torch.testing.assert_close(kv.flatten(2).norm(dim=-1), kv_learned.flatten(2).norm(dim=-1))
        assert (kv - kv_learned).abs().max() > 1e-2
        # Gaussian, not a rescaled copy of the learned prefix
        assert abs(torch.nn.functional.cosine_similarity(kv.flatten(), kv_learned.flatten(), dim=0)) < 0.5


def test_noise_reaches_generation():
    model, _ = _pair("opt", "classic")
    inputs = {k: v for k, v in make_batch("opt").items() if k != "labels"}
    run = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_scores=True)
    trained = model.generate(**inputs, **run)
    with model.prefixes_replaced_by_noise(seed=3):
        noisy = model.generate(**inputs, **run)
    assert (trained.scores[0] - noisy.scores[0]).abs().max() > 1e-3
