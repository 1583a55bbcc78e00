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


def test_cached_features_under_the_older_blip2_signature(tiny_backbone):
    """transformers 5.17 (the H200 image) has no ``mm_encoder_outputs``: its forward always calls
    ``self.get_image_features(pixel_values, ...)``. A subclass with that forward stands in for it; the cached
    path must give the pixel path's loss without running the vision tower, and leave no override behind."""
    from ptscale.models.feature_cache import takes_mm_encoder_outputs

    base, _, _ = tiny_backbone
    current = type(base)

    class OlderBlip2(current):
        def forward(self, pixel_values, input_ids, attention_mask=None, labels=None, **kwargs):
            image = self.get_image_features(pixel_values, interpolate_pos_encoding=False, return_dict=True)
            return current.forward(self, pixel_values=None, input_ids=input_ids, attention_mask=attention_mask,
                                   labels=labels, mm_encoder_outputs={"image": image}, **kwargs)

    model = PrefixTunedModel(base, PrefixConfig(lengths={"qformer": 4, "language_model": 4}, encoder_hidden=8))
    batch = _batch(model)
    rest = {k: v for k, v in batch.items() if k != "pixel_values"}
    embeds = VisionFeatureCache("k").image_embeds(model.base.vision_model, ["a", "b"], batch["pixel_values"])
    want = model(**batch).loss
    assert takes_mm_encoder_outputs(base)
    base.__class__ = OlderBlip2
    assert not takes_mm_encoder_outputs(base)
    calls = []
    base.vision_model.register_forward_hook(lambda m, i, o: calls.append(1))
    got = model(image_embeds=embeds, **rest).loss
    assert calls == []  # the features came from the cache, not from a tower run without pixels
    assert "get_image_features" not in vars(base)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)  # same ops in the same order; fp32 noise only
    # With pixels, the older forward runs the tower again through the class's own get_image_features.
    torch.testing.assert_close(model(**batch).loss, want, rtol=1e-6, atol=1e-7)
    assert calls == [1]
