import copy

import torch

from ptscale.config import PrefixConfig
from ptscale.models.feature_cache import VisionFeatureCache, fingerprint
from ptscale.prefix.model import PrefixTunedModel


def _batch(model):
    torch.manual_seed(3)
    q, img = model.config.num_query_tokens, model.config.image_token_id
    ids = torch.tensor([[img] * q + [2, 7, 8, 9], [img] * q + [2, 9, 8, 1]])
    mask = torch.ones_like(ids)
    mask[1, -1] = 0
    return {"pixel_values": torch.randn(2, 3, 32, 32), "input_ids": ids, "attention_mask": mask, "labels": ids}


def test_cached_features_give_the_same_loss_and_gradients(tiny_backbone):
    base, _, _ = tiny_backbone
    model = PrefixTunedModel(base, PrefixConfig(lengths={"qformer": 4, "language_model": 4}, encoder_hidden=8))
    batch = _batch(model)
    loss = model(**batch).loss
    grads = torch.autograd.grad(loss, list(model.prefixes.parameters()))
    cache = VisionFeatureCache("k")
    keys = ["a", "b"]
    for _ in range(2):  # miss, then hit
        rest = {k: v for k, v in batch.items() if k != "pixel_values"}
        embeds = cache.image_embeds(model.base.vision_model, keys, batch["pixel_values"])
        cached = model(image_embeds=embeds, **rest).loss
        cached_grads = torch.autograd.grad(cached, list(model.prefixes.parameters()))
        torch.testing.assert_close(cached, loss, rtol=1e-6, atol=1e-7)
        for a, b in zip(grads, cached_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert (cache.misses, cache.hits) == (2, 2)


def test_only_misses_run_the_encoder(tiny_backbone):
    base, _, _ = tiny_backbone
    calls = []
    base.vision_model.register_forward_hook(lambda m, i, o: calls.append(1))
    cache = VisionFeatureCache("k")
    pixels = torch.randn(3, 3, 32, 32)
    cache.image_embeds(base.vision_model, ["a", "b", "c"], pixels)
    cache.image_embeds(base.vision_model, ["a", "b", "c"], pixels)
    assert len(calls) == 1
    cache.image_embeds(base.vision_model, ["a", "d", "c"], pixels)
    assert len(calls) == 2 and cache.misses == 4


def test_fingerprint_changes_with_preprocessing_or_weights(tiny_backbone, tmp_path):
    _, _, proc = tiny_backbone
    key = fingerprint(proc, {"w": "1"})
    other = copy.deepcopy(proc)
    other.image_mean = [0.1, 0.2, 0.3]
    assert fingerprint(other, {"w": "1"}) != key
    assert fingerprint(proc, {"w": "2"}) != key
    cache = VisionFeatureCache(key, tmp_path)
    cache.entries["a"] = torch.ones(2, 3)
    cache.save()
    assert torch.equal(VisionFeatureCache(key, tmp_path).entries["a"], torch.ones(2, 3))
    assert VisionFeatureCache(fingerprint(other, {"w": "1"}), tmp_path).entries == {}
