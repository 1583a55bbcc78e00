"""Backbone + prefixes + tuners: the trainable model a recipe describes (no DeepSpeed involved)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ptscale.config import RecipeError, RunConfig
from ptscale.models.backbone import Backbone, BackboneSource
from ptscale.models.groups import check_trainable
from ptscale.prefix.model import PrefixTunedModel
from ptscale.tuners.adapter import inject_adapters
from ptscale.tuners.lora import inject_lora

log = logging.getLogger(__name__)


def build_model(cfg: RunConfig, backbone: Backbone, *, quiet: bool = False) -> PrefixTunedModel:
    """Tuners go in before the first engine: ZeRO-3 only shards parameters that exist at initialize.

    Prefixes exist only when a stage trains them (``config`` drops them otherwise). In a plan whose prefix
    stage comes later (X->prefix) they exist from the start, since ZeRO-3 partitions parameters at the first
    engine, but stay dormant (no part in any forward) until the recipe wakes them at that stage."""
    model = PrefixTunedModel(backbone.model, cfg.prefix)
    if any("lora" in s.train for s in cfg.stages):
        inject_lora(model, cfg.lora)
    if any("adapter" in s.train for s in cfg.stages):
        injected = inject_adapters(model, cfg.adapter)
        if not quiet:
            log.warning("%s adapters in %s: bottleneck %d, %s parameters", cfg.adapter.kind,
                        ", ".join(cfg.adapter.components), injected.bottleneck, f"{injected.num_params:,}")
    for i, stage in enumerate(cfg.stages):  # before any compute: config validation knows only BLIP-2's groups
        check_trainable(model, stage.train, f"stages.{i}.train")
    if cfg.model.gradient_checkpointing:
        backbone.model.activation_checkpointing_enable({"use_reentrant": False})
    return model


def check_buildable(cfg: RunConfig, source: BackboneSource) -> None:
    """Build the recipe's model on the meta device (no memory, no weights): prefix targets, LoRA targets and
    adapters that do not fit the model fail here in one line, before a run directory or a weight exists."""
    from ptscale.models.backbone import new_model
    from ptscale.prefix.targets import PrefixHookError

    with torch.device("meta"):
        base = new_model(source.family, source.config)
        try:
            build_model(cfg, Backbone(base, source.tokenizer, source.image_processor, Path("<meta>")), quiet=True)
        except PrefixHookError as e:
            raise RecipeError(f"prefix.lengths: {e}") from None
        except ValueError as e:
            raise RecipeError(str(e) if str(e).startswith(("lora.", "adapter.")) else f"lora/adapter: {e}") from None
