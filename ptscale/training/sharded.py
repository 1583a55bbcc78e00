"""Backbones too large for one rank, built sharded from the first parameter.

``build_sharded_backbone`` builds a named preset (e.g. ``blip2-opt-2.7b``) with random weights under
DeepSpeed ZeRO-3's ``zero.Init``, through transformers' own path: while an ``HfDeepSpeedConfig`` is
alive, ``Blip2ForConditionalGeneration._from_config`` enters ``zero.Init`` (every module's parameters
are partitioned as soon as that module is constructed) and then initialises the weights one module at
a time, gathered (``initialize_weights_zero3``). No rank ever holds the whole model. Wrapping the plain
constructor in ``deepspeed.zero.Init`` instead fails in transformers 5.23: ``post_init`` indexes the
already partitioned (0,)-shaped word embeddings (``IndexError`` at ``weight[padding_idx]``).
``load_sharded_backbone`` is the same for a checkpoint directory (``model.path``) via ``from_pretrained``.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed
from torch import nn

from ptscale.config import ModelConfig
from ptscale.dist import gather_objects
from ptscale.models.backbone import DTYPES, Backbone, BackboneSource, load_backbone
from ptscale.models.memory import memory_report, reset_peaks
from ptscale.models.presets import preset_parts

log = logging.getLogger(__name__)

# HfDeepSpeedConfig registers itself with transformers through a weak reference only; it must outlive
# every ZeRO-3-aware transformers call on the model (construction here; from_pretrained; resizing
# embeddings). Keyed weakly by the model: the config lives exactly as long as the model it built.
_LIVE_DS_CONFIGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_zero3_config(ds_config: dict, dtype: str) -> None:
    """A resolved ZeRO-3 config whose precision matches ``dtype`` (zero.Init takes its dtype from it)."""
    if int(ds_config.get("zero_optimization", {}).get("stage", 0)) != 3:
        raise ValueError("building sharded needs a ZeRO stage-3 DeepSpeed config (ds_configs/zero3.json)")

    def autos(node: dict, prefix: str = "") -> list[str]:
        found = []
        for key, value in node.items():
            if isinstance(value, dict):
                found += autos(value, f"{prefix}{key}.")
            elif value == "auto":
                found.append(prefix + key)
        return found

    if unresolved := autos(ds_config):
        raise ValueError(f"DeepSpeed config still has 'auto' at {', '.join(unresolved)}; resolve it first "
                         "(ptscale.training.engine.resolve_ds_config)")
    enabled = {name for name in ("bf16", "fp16") if ds_config.get(name, {}).get("enabled", False)}
    expected = {dtype} & {"bf16", "fp16"}
    if enabled != expected:
        raise ValueError(f"model dtype {dtype} but the DeepSpeed config enables {sorted(enabled) or 'neither'} of "
                         "bf16/fp16: zero.Init would build in another precision than the engine trains in")


def build_sharded_backbone(preset: str, ds_config: dict, dtype: str) -> Backbone:
    """A random-weights preset, partitioned over the current ZeRO-3 world while it is built.

    ``ds_config`` is a resolved DeepSpeed config (no "auto"); torch.distributed must be initialised
    (``ptscale.training.engine.init_distributed``). The tokenizer is the synthetic word tokenizer: the
    preset's vocabulary (50304 for OPT) is larger than it, which only leaves rows unused.
    """
    from transformers import Blip2ForConditionalGeneration

    cfg, tokenizer, processor = preset_parts(preset)
    with _zero3_transformers(ds_config, dtype) as hf_ds_config:
        model = Blip2ForConditionalGeneration._from_config(cfg, dtype=DTYPES[dtype])
        _finish_sharding(model, ds_config, hf_ds_config)
    return Backbone(model, tokenizer, processor, Path(f"<random {preset}>"))


def build_random_backbone(preset: str, dtype: str) -> Backbone:
    """The same random-weights preset, whole on this rank (no ZeRO-3)."""
    from transformers import Blip2ForConditionalGeneration

    cfg, tokenizer, processor = preset_parts(preset)
    model = Blip2ForConditionalGeneration._from_config(cfg, dtype=DTYPES[dtype])
    return Backbone(model, tokenizer, processor, Path(f"<random {preset}>"))


def load_sharded_backbone(path: str | Path, ds_config: dict, dtype: str,
                          family: str = "blip2") -> tuple[Backbone, bool]:
    """``model.path`` under ZeRO-3: ``from_pretrained`` with an HfDeepSpeedConfig alive builds under
    zero.Init and loads the checkpoint into the partitions (no rank materialises the whole model). Returns the
    backbone and whether it was built under zero.Init (False: loaded whole, then partitioned)."""
    from ptscale.models.backbone import load_backbone

    with _zero3_transformers(ds_config, dtype) as hf_ds_config:
        backbone = load_backbone(path, dtype, family=family)
        under_init = any(hasattr(p, "ds_id") for p in backbone.model.parameters())
        if not under_init:
            # a loader outside from_pretrained (VinVL: its released layout is read by ptscale) builds the model
            # whole; it is partitioned below, but every rank held all of it once: say so, never claim zero.Init
            log.warning("model.path %s (%s) is loaded whole on every rank, then partitioned: its loader does not "
                        "build under zero.Init, so each rank needs the memory of the whole model once", path, family)
        _finish_sharding(backbone.model, ds_config, hf_ds_config)
    return backbone, under_init


@contextlib.contextmanager
def _zero3_transformers(ds_config: dict, dtype: str) -> Iterator[object]:
    """An HfDeepSpeedConfig for the block: transformers' from_config / from_pretrained see ZeRO-3 and
    enter zero.Init themselves (transformers holds only a weak reference to it)."""
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    check_zero3_config(ds_config, dtype)
    hf_ds_config = HfDeepSpeedConfig(ds_config)
    if not is_deepspeed_zero3_enabled():
        raise RuntimeError("transformers does not see ZeRO-3 although an HfDeepSpeedConfig is alive")
    yield hf_ds_config


def _finish_sharding(model: nn.Module, ds_config: dict, hf_ds_config: object) -> None:
    if any(not hasattr(p, "ds_id") for p in model.parameters()):
        # zero.Init partitions a module's own parameters right after its __init__; a parameter assigned
        # to an already built submodule escapes (Blip2Attention sets its qkv Linear's bias afterwards:
        # 3 x hidden elements per ViT layer). Partition those now, broadcast from rank 0.
        import deepspeed

        deepspeed.zero.Init(module=model, config_dict_or_path=ds_config)
    whole = [n for n, p in model.named_parameters() if not hasattr(p, "ds_id")]
    if whole:  # a silent fallback to plain construction would put the whole model on every rank
        raise RuntimeError(f"{len(whole)} parameters were built outside zero.Init, e.g. {whole[:3]}")
    # Later ZeRO-3-aware transformers calls on this model (resizing embeddings, generation) need the
    # config too: it now lives exactly as long as the model.
    _LIVE_DS_CONFIGS[model] = hf_ds_config


def cast_added_parameters(model: nn.Module, dtype: str) -> int:
    """Cast the parameters added after a zero.Init build (prefix encoders, LoRA, adapters: created in
    fp32) to the model dtype; returns how many were cast (0 for a model not built under zero.Init).

    DeepSpeed casts a module to bf16/fp16 at initialize only when it was not built under zero.Init
    (engine._cast_module_mixed_precision); otherwise the fp32 additions stay fp32 and ZeRO-3 stops at
    ``assert len(set(t.dtype for t in tensors)) == 1`` (zero/utils.py defragment). They stay whole
    (not partitioned) so a checkpoint can still be copied into them; initialize partitions them,
    broadcasting rank 0's values.
    """
    params = list(model.parameters())
    if not any(hasattr(p, "ds_id") for p in params):
        return 0  # not built sharded: the engine casts the whole module itself
    target = DTYPES[dtype]
    cast = 0
    for p in params:
        if not hasattr(p, "ds_id") and p.is_floating_point() and p.dtype != target:
            p.data = p.data.to(target)
            cast += 1
    return cast




def build_backbone(source: BackboneSource, model_cfg: ModelConfig, zero3_config: dict | None) -> Backbone:
    """The backbone a run trains, whole or sharded: a checkpoint (``model.path``), the cached embedded default,
    or random weights (a preset without an embedded pre-training, or ``pretrain_steps: 0``).

    ``zero3_config``: the resolved DeepSpeed config when the run uses ZeRO-3 (None otherwise). Then a checkpoint
    or a random build is partitioned from the first parameter (zero.Init): no rank ever holds the whole model.
    The embedded default is small and loads whole (ZeRO-3 partitions it at the first engine), and so does a
    quantised base (bitsandbytes quantises while loading, which zero.Init cannot)."""
    m = model_cfg
    random_weights = source.path is None
    if random_weights:
        log.warning("model.preset=%s without model.path: RANDOM weights (geometry, memory and throughput checks; "
                    "point model.path at a checkpoint to train for real)", m.preset)
    sharded = zero3_config is not None and m.quantization == "none" and (m.path is not None or random_weights)
    if not sharded:
        return build_random_backbone(m.preset, m.dtype) if random_weights else \
            load_backbone(source.path, m.dtype, m.quantization, source.family)
    reset_peaks()
    if random_weights:
        backbone, under_init = build_sharded_backbone(m.preset, zero3_config, m.dtype), True
    else:
        backbone, under_init = load_sharded_backbone(m.path, zero3_config, m.dtype, source.family)
    reports = gather_objects(memory_report(torch.distributed.get_rank()))  # every rank's peak, printed by rank 0
    if torch.distributed.get_rank() == 0:
        for report in reports:
            how = "under zero.Init" if under_init else "whole, then partitioned"
            print(report.line(f"built {m.path or m.preset} {how}"), flush=True)
    return backbone
