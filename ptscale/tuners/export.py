"""Exports a trained PrefixTunedModel for use outside ptscale.

- :func:`export_lora_peft`: the LoRA weights in PEFT's on-disk format, loadable with
  ``PeftModel.from_pretrained(Blip2ForConditionalGeneration..., out_dir)`` (prefixes are not part of it).
- :func:`export_merged`: LoRA merged into the weights, saved as a plain transformers model, with the prefixes
  folded beside it in ``prefixes.safetensors``; :func:`load_merged` reads it back.

Under ZeRO-3 the module parameters are shards (local shape (0,)): pass already-gathered weights to
``export_lora_peft(state=...)``. ``export_merged`` needs every weight in one process, so it runs on a model
loaded from a consolidated checkpoint, without DeepSpeed (it refuses partitioned parameters).
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn
from transformers import Blip2ForConditionalGeneration

from ptscale.config import LoraConfig, PrefixConfig
from ptscale.prefix.model import PrefixTunedModel
from ptscale.prefix.plus import PlusPrefix
from ptscale.prefix.saving import load_prefixes, save_prefixes
from ptscale.tuners.adapter import has_adapters

BASE_PREFIX = "base."  # PrefixTunedModel's name prefix of the transformers model
PEFT_PREFIX = "base_model.model."  # PeftModel's name prefix of the transformers model in its files
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX_FILE = "prefixes.safetensors"
PREFIX_CONFIG_FILE = "prefix_config.json"  # the PrefixConfig fields that re-wrap the exported model


class ExportError(RuntimeError):
    """The model cannot be exported in the requested form; the message says why."""


def _lora_layers(model: PrefixTunedModel) -> dict[str, LoraLayer]:
    """LoRA layers by module name relative to the transformers model (``base.`` stripped)."""
    found = {n[len(BASE_PREFIX):]: m for n, m in model.named_modules()
             if isinstance(m, LoraLayer) and n.startswith(BASE_PREFIX)}
    if not found:
        raise ExportError("the model has no LoRA layers (inject_lora was not called)")
    return found


def _check_lora_config(layers: Mapping[str, LoraLayer], cfg: LoraConfig, adapter: str) -> None:
    """The written adapter_config.json must describe the trained layers, or PEFT would load them wrongly
    (a wrong alpha scales every update silently)."""
    for name, layer in layers.items():
        if adapter not in layer.lora_A:
            raise ExportError(f"{name}: no LoRA adapter named {adapter!r} (has {', '.join(layer.lora_A)})")
        if layer.r[adapter] != cfg.r or abs(layer.scaling[adapter] - cfg.alpha / cfg.r) > 1e-12:
            raise ExportError(f"{name}: trained with r={layer.r[adapter]}, scaling={layer.scaling[adapter]}, but "
                              f"lora_cfg gives r={cfg.r}, alpha/r={cfg.alpha / cfg.r}; pass the config it was "
                              "injected with")


def peft_config(layers: Mapping[str, LoraLayer], cfg: LoraConfig) -> PeftLoraConfig:
    """The PEFT config of the injected LoRA (the same fields ptscale.tuners.lora.inject_lora sets), targeting
    the exact module names of the transformers model."""
    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=sorted(layers))


def export_lora_peft(model: PrefixTunedModel, out_dir: str | Path, lora_cfg: LoraConfig, *,
                     state: Mapping[str, torch.Tensor] | None = None, adapter: str = "default",
                     base_model_name_or_path: str | None = None) -> Path:
    """Writes ``adapter_config.json`` and ``adapter_model.safetensors`` as ``PeftModel.save_pretrained`` does:
    keys ``base_model.model.<module path in Blip2ForConditionalGeneration>.lora_{A,B}.weight`` (the adapter
    name is not part of the key).

    ``state``: full tensors by this model's parameter names (``base....lora_A.default.weight``), e.g.
    gathered under ZeRO-3; every LoRA parameter must be in it. Without it the module parameters are read.
    """
    layers = _lora_layers(model)
    _check_lora_config(layers, lora_cfg, adapter)
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(layers):
        for part in ("lora_A", "lora_B"):
            ours = f"{BASE_PREFIX}{name}.{part}.{adapter}.weight"
            if state is not None:
                if ours not in state:
                    raise ExportError(f"state has no {ours}; it must hold every LoRA parameter (gathered)")
                value = state[ours]
            else:
                value = getattr(layers[name], part)[adapter].weight
                if value.numel() == 0:
                    raise ExportError(f"{ours} is an empty ZeRO-3 shard; gather the LoRA weights and pass state=")
            tensors[f"{PEFT_PREFIX}{name}.{part}.weight"] = value.detach().to("cpu").contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = peft_config(layers, lora_cfg)
    cfg.base_model_name_or_path = base_model_name_or_path
    cfg.inference_mode = True  # as PeftModel.save_pretrained writes it; from_pretrained(is_trainable=True) resets it
    # as PeftModel.save_pretrained records it: lets AutoPeftModel find the base class from base_model_name_or_path
    cfg.auto_mapping = {"base_model_class": type(model.base).__name__, "parent_library": type(model.base).__module__}
    cfg.save_pretrained(str(out))
    save_file(tensors, str(out / PEFT_WEIGHTS), metadata={"format": "pt"})
    return out


def _merged_weight(name: str, layer: LoraLayer) -> torch.Tensor:
    """base weight + every active, not yet merged adapter's delta (what ``merge_and_unload`` computes), as a new
    tensor: the model being exported keeps training unmerged."""
    if not isinstance(layer, LoraLinear):
        raise ExportError(f"{name}: {type(layer).__name__} LoRA cannot be merged here (only LoRA on Linear)")
    weight = layer.get_base_layer().weight.detach()
    merged = weight.clone()
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A or adapter in layer.merged_adapters:
            continue
        if layer.use_dora.get(adapter) or layer.lora_bias.get(adapter):
            raise ExportError(f"{name}: DoRA / LoRA bias adapters are not supported by this merge")
        merged += layer.get_delta_weight(adapter).detach().to(merged.dtype)
    return merged


def merged_state_dict(base: nn.Module) -> dict[str, torch.Tensor]:
    """The transformers model's state dict with every LoRA layer replaced by its merged Linear:
    ``<m>.base_layer.weight`` + delta -> ``<m>.weight``, ``<m>.base_layer.bias`` -> ``<m>.bias``, LoRA tensors
    dropped; all other entries unchanged."""
    layers = {n: m for n, m in base.named_modules() if isinstance(m, LoraLayer)}
    state = {k: v for k, v in base.state_dict().items() if not any(k.startswith(n + ".") for n in layers)}
    for name, layer in layers.items():
        state[f"{name}.weight"] = _merged_weight(name, layer)
        bias = layer.get_base_layer().bias
        if bias is not None:
            state[f"{name}.bias"] = bias.detach()
    return state


def _prefix_config(model: PrefixTunedModel) -> dict[str, Any]:
    """PrefixConfig fields that rebuild prefix modules of the same shapes, to be folded and loaded into:
    ``encoder="none"`` because folding replaces the encoder anyway (the cheapest one to build)."""
    feature_maps = {m.feature_map for m in model.prefixes.values() if isinstance(m, PlusPrefix)}
    fields: dict[str, Any] = {"lengths": {t: m.shape.length for t, m in model.prefixes.items()},
                              "kind": model.kind, "encoder": "none"}
    if feature_maps:
        (fields["feature_map"],) = feature_maps  # one PrefixConfig, one feature map for every target
    return fields


@contextlib.contextmanager
def _folded_prefixes(model: PrefixTunedModel) -> Iterator[None]:
    """Inside the block ``model.prefixes`` is a folded copy (static keys/values, appendix B.1); the model's own
    prefix modules (which may still be training) are put back untouched afterwards."""
    original = model.prefixes
    model.prefixes = copy.deepcopy(original)
    try:
        model.fold_prefixes()
        yield
    finally:
        model.prefixes = original


def _check_unpartitioned(model: nn.Module) -> None:
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise ExportError("export_merged needs the whole model in one process: it reads and copies every weight, "
                          "which ZeRO-3 partitions. Consolidate the checkpoint (zero_to_fp32 or "
                          "save_16bit_model), load it without DeepSpeed, and export from there")


def export_merged(model: PrefixTunedModel, out_dir: str | Path, tokenizer: Any = None,
                  image_processor: Any = None) -> Path:
    """Saves the transformers model with LoRA merged into its weights (``model.safetensors`` + config, loadable by
    ``Blip2ForConditionalGeneration.from_pretrained``), the prefixes folded to static keys/values in
    ``prefixes.safetensors`` (``ptscale.prefix.saving`` format) with ``prefix_config.json`` to re-wrap them
    (:func:`load_merged`), and the tokenizer / image processor if given.

    The model itself is not modified (LoRA stays unmerged, prefixes unfolded). Sequential and parallel
    adapters cannot be merged: they apply a nonlinearity (``W x + U f(D W x)`` is not ``W' x`` for any ``W'``),
    so a model with adapters raises :class:`ExportError`; save its trainable weights instead.
    """
    if has_adapters(model):
        raise ExportError("the model has sequential/parallel adapters, which cannot be merged into the weights "
                          "(they apply a nonlinearity); save the trainable weights instead of a merged model")
    _check_unpartitioned(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # save_pretrained consumes the dict it is given (it pops tensors while writing shards).
    model.base.save_pretrained(str(out), state_dict=merged_state_dict(model.base))
    if len(model.prefixes):
        (out / PREFIX_CONFIG_FILE).write_text(json.dumps(_prefix_config(model), indent=2, sort_keys=True))
        with _folded_prefixes(model):
            save_prefixes(model, out / PREFIX_FILE)
    for extra in (tokenizer, image_processor):
        if extra is not None:
            extra.save_pretrained(str(out))
    return out


def load_merged(out_dir: str | Path, **from_pretrained_kwargs: Any) -> PrefixTunedModel:
    """The inverse of :func:`export_merged`: the merged transformers model wrapped with its folded prefixes
    (no prefixes if the export had none)."""
    out = Path(out_dir)
    base = Blip2ForConditionalGeneration.from_pretrained(str(out), **from_pretrained_kwargs)
    if not (out / PREFIX_FILE).is_file():
        return PrefixTunedModel(base, PrefixConfig(lengths={}))
    model = PrefixTunedModel(base, PrefixConfig(**json.loads((out / PREFIX_CONFIG_FILE).read_text())))
    model.fold_prefixes()
    load_prefixes(model, out / PREFIX_FILE)  # checks kind, targets, folded state and shapes
    return model
