"""Backbone + prefixes + tuners: the trainable model a recipe describes (no DeepSpeed involved)."""

from __future__ import annotations

import logging

from ptscale.config import RunConfig
from ptscale.models.backbone import Backbone
from ptscale.prefix.model import PrefixTunedModel
from ptscale.tuners.adapter import inject_adapters
from ptscale.tuners.lora import inject_lora

log = logging.getLogger(__name__)


def build_model(cfg: RunConfig, backbone: Backbone) -> PrefixTunedModel:
    """Tuners go in before the first engine: ZeRO-3 only shards parameters that exist at initialize."""
    model = PrefixTunedModel(backbone.model, cfg.prefix)
    if any("lora" in s.train for s in cfg.stages):
        inject_lora(model, cfg.lora)
    if any("adapter" in s.train for s in cfg.stages):
        injected = inject_adapters(model, cfg.adapter)
        log.warning("%s adapters in %s: bottleneck %d, %s parameters", cfg.adapter.kind,
                    ", ".join(cfg.adapter.components), injected.bottleneck, f"{injected.num_params:,}")
    if cfg.model.gradient_checkpointing:
        backbone.model.activation_checkpointing_enable({"use_reentrant": False})
    return model
