"""Frozen-tower feature cache: the vision encoder's outputs per image, computed once, reused every epoch.

Valid only in a stage where the vision encoder is frozen and carries no prefix or tuner (the prefix stage
of the BLIP-2 recipe); :func:`cache_for_stage` decides that from the stage's groups. Entries are keyed by image id and
a fingerprint of the preprocessing (the image processor's settings) and of the vision weights, so a change
of either invalidates them. Kept in host memory; ``directory`` adds an on-disk copy (safetensors, one file
per fingerprint) that later runs reuse.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn
from transformers.models.blip_2.modeling_blip_2 import BaseModelOutputWithVisionQformerOutputs

from ptscale.config import DataConfig, FeatureCacheConfig
from ptscale.models.groups import group_of

log = logging.getLogger(__name__)


def cache_for_stage(model: nn.Module, stage_train: list[str], cfg: FeatureCacheConfig, prefix_lengths: dict[str, int],
                    data: DataConfig, image_processor, digests: dict[str, str],
                    current: VisionFeatureCache | None) -> VisionFeatureCache | None:
    """The policy: a stage may reuse the vision encoder's outputs when the tower is frozen, prefix- and
    tuner-free, and the Q-Former's query tokens are frozen too (they are read after the tower). The key covers
    the image processor, the tower's weights (``digests``: sha256 per parameter name) and the data config;
    ``current`` is kept when its key still holds."""
    vision_params = [n for n, _ in model.named_parameters() if n.startswith("base.vision_model.")]
    if not cfg.enabled or prefix_lengths.get("vision", 0) > 0:
        return None
    if any(group_of(n) in ("lora", "adapter") for n in vision_params) or {"vision", "qformer"} & set(stage_train):
        return None
    if not hasattr(model.base, "vision_model") or not hasattr(model.base, "query_tokens"):
        return None
    vision = {n: d for n, d in digests.items() if n in vision_params}
    data_digest = hashlib.sha256(json.dumps(dataclasses.asdict(data), sort_keys=True).encode()).hexdigest()
    key = fingerprint(image_processor, {**vision, "data": data_digest})
    if current is not None and current.key == key:
        return current
    return VisionFeatureCache(key, Path(cfg.directory) if cfg.directory else None)


def fingerprint(image_processor, vision_digests: dict[str, str]) -> str:
    h = hashlib.sha256(image_processor.to_json_string().encode())
    for name in sorted(vision_digests):
        h.update(f"{name}={vision_digests[name]}".encode())
    return h.hexdigest()[:16]


class VisionFeatureCache:
    def __init__(self, key: str, directory: Path | None = None) -> None:
        self.key = key
        self.directory = directory
        self.entries: dict[str, torch.Tensor] = {}
        self.hits = self.misses = 0
        if directory is not None and self._file.is_file():
            self.entries = dict(load_file(self._file))
            log.warning("feature cache: %d entries from %s", len(self.entries), self._file)

    @property
    def _file(self) -> Path:
        return self.directory / f"vision-{self.key}.safetensors"

    def save(self) -> None:
        if self.directory is not None and self.entries:
            from ptscale.checkpoint import save_safetensors_atomic

            save_safetensors_atomic(self.entries, self._file, metadata={"fingerprint": self.key})

    @torch.no_grad()
    def image_embeds(self, vision_model: nn.Module, keys: list[str], pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, tokens, hidden) for the batch; misses run the vision encoder on just those images."""
        missing = [i for i, k in enumerate(keys) if k not in self.entries]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if _any_rank(bool(missing)):  # under ZeRO-3 the encoder's forward is a collective: all ranks run it
            idx = missing or [0]
            out = vision_model(pixel_values=pixel_values[idx], return_dict=True).last_hidden_state
            for j, i in enumerate(missing):
                self.entries[keys[i]] = out[j].detach().cpu().clone()
        return torch.stack([self.entries[k] for k in keys]).to(pixel_values.device)


def _any_rank(flag: bool) -> bool:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def blip2_image_features(base: nn.Module, image_embeds: torch.Tensor) -> BaseModelOutputWithVisionQformerOutputs:
    """BLIP-2's get_image_features from step 2 on (Q-Former, projection), from cached vision-encoder outputs."""
    image_attention_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    query_tokens = base.query_tokens.expand(image_embeds.shape[0], -1, -1)
    qformer_outputs = base.qformer(query_embeds=query_tokens, encoder_hidden_states=image_embeds,
                                   encoder_attention_mask=image_attention_mask, return_dict=True)
    query_output = qformer_outputs[0].to(image_embeds.dtype)
    features = base.language_projection(query_output)
    return BaseModelOutputWithVisionQformerOutputs(last_hidden_state=image_embeds, pooler_output=features,
                                                   qformer_outputs=qformer_outputs)


def takes_mm_encoder_outputs(base: nn.Module) -> bool:
    """Whether this transformers' BLIP-2 forward accepts precomputed image features (``mm_encoder_outputs``,
    added after 5.17; the H200 image has 5.17)."""
    return "mm_encoder_outputs" in inspect.signature(type(base).forward).parameters


def blip2_forward_with_image_features(base: nn.Module, image: BaseModelOutputWithVisionQformerOutputs,
                                      batch: dict):
    """``base(**batch)`` with the image features given instead of computed from ``pixel_values``.

    Newer transformers take them as ``mm_encoder_outputs``. Older ones (5.17) have no such argument: their
    forward always calls ``self.get_image_features(pixel_values, ...)``, which would run the vision tower
    with no pixels ("You have to specify pixel_values"). There, an instance attribute shadows
    ``get_image_features`` for this one call and returns the given features; it is removed afterwards, so
    generation and uncached batches see the class's own method.
    """
    batch = {k: v for k, v in batch.items() if k != "pixel_values"}
    if takes_mm_encoder_outputs(base):
        return base(pixel_values=None, mm_encoder_outputs={"image": image}, **batch)
    if "get_image_features" in vars(base):
        raise RuntimeError("blip2_forward_with_image_features: get_image_features is already overridden "
                           "on this model (a nested call?)")

    def get_image_features(*args, **kwargs) -> BaseModelOutputWithVisionQformerOutputs:
        return image

    base.get_image_features = get_image_features
    try:
        return base(pixel_values=None, **batch)
    finally:
        del base.get_image_features
