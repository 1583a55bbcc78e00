"""Exports a trained PrefixTunedModel for use outside ptscale; every export says what it holds.

- :func:`export_merged`: LoRA merged into the weights, saved as a plain transformers model in a subfolder
  (``without_prefixes/`` when the model has prefixes, ``model/`` when it has none), the prefixes folded to static
  keys/values beside it (``prefixes.safetensors`` + ``prefix_config.json``) and, for a decoder-only language
  model, the LM prefix as one plain tensor (``lm_prefix.safetensors``, for a pre-filled ``DynamicCache``).
  ``ptscale.from_pretrained(out_dir)`` reproduces the trained model; ``from_pretrained`` of the subfolder alone
  gives base + LoRA without any prefix, which is why it is not at the top level.
- :func:`export_lora_peft`: the LoRA weights in PEFT's on-disk format, with the folded prefixes beside them:
  ``PeftModel.from_pretrained(base, out_dir)`` attaches the LoRA only; ``ptscale.from_pretrained(out_dir)``
  attaches both.
- ``ptscale.prefix.peft_interop.export_prefix_peft``: the LM prefix as a PEFT prefix-tuning adapter.

Each export directory holds ``manifest.json`` (:func:`write_manifest`): what it contains, the base it needs
(path and :func:`ptscale.models.backbone.backbone_digest`), what it does not reproduce on its own, how to load it.

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

from ptscale.config import LoraConfig
from ptscale.models.backbone import backbone_digest
from ptscale.prefix.model import LM_TARGET, PrefixTunedModel, position_family
from ptscale.prefix.peft_interop import lm_prefix_kv
from ptscale.prefix.plus import PlusPrefix
from ptscale.prefix.saving import save_prefixes
from ptscale.tuners.adapter import has_adapters

BASE_PREFIX = "base."  # PrefixTunedModel's name prefix of the transformers model
PEFT_PREFIX = "base_model.model."  # PeftModel's name prefix of the transformers model in its files
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX_FILE = "prefixes.safetensors"
PREFIX_CONFIG_FILE = "prefix_config.json"  # the PrefixConfig fields that re-wrap the exported model
LM_PREFIX_FILE = "lm_prefix.safetensors"  # the LM prefix as one (layers, 2, heads, P, head_dim) tensor "kv"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "ptscale-export/1"
WITH_PREFIXES_DIR, NO_PREFIXES_DIR = "without_prefixes", "model"  # the merged transformers model's subfolder


class ExportError(RuntimeError):
    """The model cannot be exported in the requested form; the message says why."""


def _lora_layers(model: PrefixTunedModel) -> dict[str, LoraLayer]:
    """LoRA layers by module name relative to the transformers model (``base.`` stripped)."""
    found = {n[len(BASE_PREFIX):]: m for n, m in model.named_modules()
             if isinstance(m, LoraLayer) and n.startswith(BASE_PREFIX)}
    if not found:
        raise ExportError("the model has no LoRA layers (the run trained no LoRA, or inject_lora was not called); "
                          "nothing to write with --peft")
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
                     base_model_name_or_path: str | Path | None = None, base_digest: str | None = None,
                     source: Mapping[str, Any] | None = None) -> Path:
    """Writes ``adapter_config.json`` and ``adapter_model.safetensors`` as ``PeftModel.save_pretrained`` does:
    keys ``base_model.model.<module path in the transformers model>.lora_{A,B}.weight`` (the adapter name is not
    part of the key); beside them the folded prefixes (``prefixes.safetensors`` + ``prefix_config.json``, which
    PEFT ignores) and ``manifest.json``. ``PeftModel.from_pretrained(base, out_dir)`` attaches the LoRA alone;
    ``ptscale.from_pretrained(out_dir)`` attaches LoRA and prefixes.

    ``state``: full tensors by this model's parameter names (``base....lora_A.default.weight``), e.g.
    gathered under ZeRO-3; every LoRA parameter must be in it. Without it the module parameters are read (then the
    prefixes are read too: under ZeRO-3 they are gathered).
    ``base_model_name_or_path``: recorded in adapter_config.json (``AutoPeftModel`` loads the base from it) and in
    the manifest with ``base_digest`` (computed from the directory when not given).
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
    cfg.base_model_name_or_path = None if base_model_name_or_path is None else str(base_model_name_or_path)
    cfg.inference_mode = True  # as PeftModel.save_pretrained writes it; from_pretrained(is_trainable=True) resets it
    # as PeftModel.save_pretrained records it: lets AutoPeftModel find the base class from base_model_name_or_path
    cfg.auto_mapping = {"base_model_class": type(model.base).__name__, "parent_library": type(model.base).__module__}
    cfg.save_pretrained(str(out))
    save_file(tensors, str(out / PEFT_WEIGHTS), metadata={"format": "pt"})
    files = {"adapter_config.json": "PEFT LoRA config", PEFT_WEIGHTS: f"LoRA weights ({len(layers)} layers)"}
    files.update(_write_folded_prefixes(model, out))
    has_prefix = _has_prefixes(model)
    base = base_info(model, base_model_name_or_path, base_digest)
    peft_load = (f"PeftModel.from_pretrained({base['class']}.from_pretrained(BASE), {str(out)!r})  "
                 "# LoRA only" + (", WITHOUT the prefixes" if has_prefix else ""))
    not_included = ["the base weights (load them from base.name_or_path; check base.sha256)"]
    warnings = []
    if has_prefix:
        not_included.append("PEFT applies the LoRA only: the prefixes beside it (prefixes.safetensors) are ignored "
                            "by PeftModel.from_pretrained / AutoPeftModel")
        warnings.append("PeftModel.from_pretrained on this directory does NOT reproduce the trained model: it "
                        f"loads the LoRA without the prefixes ({_targets_text(model)}). Use "
                        f"ptscale.from_pretrained({str(out)!r}), or export --merged")
    manifest = _manifest(
        "peft-lora", model, files=files, base=base, needs_base=True,
        reproduces={"ptscale.from_pretrained": True, "peft.PeftModel.from_pretrained": not has_prefix},
        not_included=not_included, warnings=warnings, source=source,
        load={"ptscale": f"ptscale.from_pretrained({str(out)!r})", "peft": peft_load})
    write_manifest(out, manifest)
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
                              "kind": model.kind, "encoder": "none", "positions": model.positions}
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
                  image_processor: Any = None, *, base_model_name_or_path: str | Path | None = None,
                  base_digest: str | None = None, source: Mapping[str, Any] | None = None) -> Path:
    """Saves the transformers model with LoRA merged into its weights (``save_pretrained``: ``model.safetensors``
    + config, and the tokenizer / image processor if given) in the subfolder ``without_prefixes/`` (``model/``
    when the model has no prefixes), the prefixes folded to static keys/values in ``prefixes.safetensors``
    (``ptscale.prefix.saving`` format) with ``prefix_config.json`` to re-wrap them, the LM prefix of a
    decoder-only LM as a plain tensor in ``lm_prefix.safetensors``, and ``manifest.json``.
    ``ptscale.from_pretrained(out_dir)`` reproduces the model; the subfolder alone is base + LoRA only.

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
    has_prefix = _has_prefixes(model)
    sub = WITH_PREFIXES_DIR if has_prefix else NO_PREFIXES_DIR
    # save_pretrained consumes the dict it is given (it pops tensors while writing shards).
    model.base.save_pretrained(str(out / sub), state_dict=merged_state_dict(model.base))
    for extra in (tokenizer, image_processor):
        if extra is not None:
            extra.save_pretrained(str(out / sub))
    cls = type(model.base).__name__
    has_lora = any(isinstance(m, LoraLayer) for m in model.modules())
    files = {f"{sub}/": f"{cls} ({'base with LoRA merged' if has_lora else 'base'}"
                        f"{', WITHOUT the prefixes' if has_prefix else ''}; transformers from_pretrained)"}
    files.update(_write_folded_prefixes(model, out))
    lm_only = set(model.prefixes) <= {LM_TARGET}
    cache_ok = False
    if has_prefix and LM_TARGET in model.prefixes and model.kind == "classic" and position_family(model.base):
        save_file({"kv": lm_prefix_kv(model)}, str(out / LM_PREFIX_FILE),
                  metadata={"format": "ptscale-lm-prefix/1", "layout": "(layers, 2: key/value, kv_heads, P, head_dim)",
                            "positions": model.positions})
        files[LM_PREFIX_FILE] = ("the language-model prefix as one tensor 'kv' (layers, 2, kv_heads, P, head_dim), "
                                 "for a pre-filled DynamicCache (README)")
        cache_ok = lm_only and model.positions == "shift"
    base = base_info(model, base_model_name_or_path, base_digest)
    load = {"ptscale": f"ptscale.from_pretrained({str(out)!r})",
            "transformers": _import_line(model.base) + f"{cls}.from_pretrained({str(out / sub)!r})"
                            + ("  # WITHOUT the prefixes" if has_prefix else "")}
    not_included = []
    warnings = []
    if has_prefix:
        not_included.append(f"{sub}/ alone has no prefixes: transformers' from_pretrained ignores the files beside it")
        reason = ("" if cache_ok else " (a pre-filled DynamicCache cannot stand in for them: "
                  + ("prefix.kind=plus" if model.kind != "classic"
                     else "a prefix outside the language model" if not lm_only
                     else "prefix.positions=keep" if model.positions != "shift"
                     else "not a decoder-only language model") + ")")
        warnings.append(f"{cls}.from_pretrained({str(out / sub)!r}) alone does NOT reproduce the trained model: it "
                        f"has no prefixes ({_targets_text(model)}){reason}. Use "
                        f"ptscale.from_pretrained({str(out)!r})")
        if cache_ok:
            load["transformers+DynamicCache"] = (f"fill a DynamicCache from {LM_PREFIX_FILE} and prepend P ones to the "
                                                 "attention mask (README 'Exporting')")
    manifest = _manifest(
        "merged", model, files=files, base=base, needs_base=False,
        reproduces={"ptscale.from_pretrained": True, "transformers.from_pretrained": not has_prefix,
                    "transformers+DynamicCache": cache_ok or not has_prefix},
        not_included=not_included, warnings=warnings, source=source, load=load)
    write_manifest(out, manifest)
    return out


# --- what an export holds --------------------------------------------------------------------------------
def _has_prefixes(model: PrefixTunedModel) -> bool:
    return any(m.shape.length > 0 for m in model.prefixes.values())


def _targets_text(model: PrefixTunedModel) -> str:
    return ", ".join(f"{t}: {m.shape.length}" for t, m in model.prefixes.items()) or "none"


def _write_folded_prefixes(model: PrefixTunedModel, out: Path) -> dict[str, str]:
    """prefixes.safetensors (folded) + prefix_config.json when the model has prefixes; their descriptions."""
    if not _has_prefixes(model):
        return {}
    (out / PREFIX_CONFIG_FILE).write_text(json.dumps(_prefix_config(model), indent=2, sort_keys=True))
    with _folded_prefixes(model):
        save_prefixes(model, out / PREFIX_FILE)
    return {PREFIX_FILE: f"every prefix folded to static keys/values ({_targets_text(model)}; ptscale format)",
            PREFIX_CONFIG_FILE: "the prefix settings that re-wrap the model (kind, lengths, positions)"}


def _import_line(base: torch.nn.Module) -> str:
    """Where the base's class comes from, when it is not transformers' own (VinVL and OFA are ptscale's)."""
    module = type(base).__module__
    return "" if module.startswith("transformers.") else f"from {module} import {type(base).__name__}; "


def base_info(model: PrefixTunedModel, name_or_path: str | Path | None, digest: str | None = None) -> dict[str, Any]:
    """The base an export was made against: path, weights digest (computed from a local directory when not
    given), class."""
    if digest is None and name_or_path is not None and Path(name_or_path).is_dir():
        with contextlib.suppress(FileNotFoundError):
            digest = backbone_digest(name_or_path)
    return {"name_or_path": None if name_or_path is None else str(name_or_path), "sha256": digest,
            "class": type(model.base).__name__}


def _manifest(export: str, model: PrefixTunedModel, *, files: Mapping[str, str], base: Mapping[str, Any],
              needs_base: bool, reproduces: Mapping[str, bool], not_included: list[str], warnings: list[str],
              load: Mapping[str, str], source: Mapping[str, Any] | None) -> dict[str, Any]:
    lora = sorted({n for n, m in model.base.named_modules() if isinstance(m, LoraLayer)})
    warnings = list(warnings)
    if needs_base and base["name_or_path"] is None:
        warnings.append("the base model is not recorded (base_model_name_or_path=None): the loader must be given "
                        "the base explicitly")
    return {
        "format": MANIFEST_FORMAT, "export": export, "files": dict(files),
        "base": {**base, "needed": needs_base},
        "prefixes": {"kind": model.kind, "positions": model.positions,
                     "targets": {t: m.shape.length for t, m in model.prefixes.items()}},
        "lora": {"layers": len(lora), "merged": export == "merged"} if lora else None,
        "reproduces_trained_model": dict(reproduces), "not_included": list(not_included),
        "warnings": warnings, "load": dict(load), "source": dict(source or {}),
    }


def write_manifest(out: Path, manifest: Mapping[str, Any]) -> None:
    (Path(out) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def read_manifest(out: str | Path) -> dict[str, Any]:
    path = Path(out) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{out}: no {MANIFEST}; not a ptscale export directory")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, this ptscale reads {MANIFEST_FORMAT!r}")
    return manifest


def format_manifest(out: str | Path, manifest: Mapping[str, Any]) -> str:
    """The manifest as the lines ``ptscale export`` prints; warnings first, in capitals, so they are seen."""
    lines = [f"WARNING: {w}" for w in manifest["warnings"]]
    lines.append(f"{manifest['export']} export: {out}")
    lines += [f"  {name:<28} {what}" for name, what in manifest["files"].items()]
    base = manifest["base"]
    need = "needed" if base["needed"] else "not needed to load (recorded for provenance)"
    lines.append(f"  base: {base['name_or_path']} ({base['class']}, sha256 {base['sha256']}; {need})")
    lines.append("  prefixes: " + (", ".join(f"{t}={n}" for t, n in manifest["prefixes"]["targets"].items()) or "none")
                 + f" (kind {manifest['prefixes']['kind']}, positions {manifest['prefixes']['positions']})")
    lines += [f"  not included: {x}" for x in manifest["not_included"]]
    lines += [f"  reproduces the trained model with {k}: {'yes' if v else 'NO'}"
              for k, v in manifest["reproduces_trained_model"].items()]
    lines += [f"  load ({k}): {v}" for k, v in manifest["load"].items()]
    return "\n".join(lines)


def export_lm_prefix_peft(model: PrefixTunedModel, out_dir: str | Path, *,
                          base_model_name_or_path: str | Path | None = None, base_digest: str | None = None,
                          source: Mapping[str, Any] | None = None) -> Path:
    """The ``language_model`` prefix as a PEFT prefix-tuning adapter
    (``ptscale.prefix.peft_interop.export_prefix_peft``) plus ``manifest.json`` saying what PEFT alone does not
    reproduce: other prefix targets (the Q-Former's has no PEFT counterpart), LoRA, ``positions=keep``."""
    from ptscale.prefix.peft_interop import export_prefix_peft, language_model

    out = export_prefix_peft(model, out_dir, base_model_name_or_path=None if base_model_name_or_path is None
                             else str(base_model_name_or_path))
    lm_cls = type(language_model(model.base)).__name__
    others = {t: m.shape.length for t, m in model.prefixes.items() if t != LM_TARGET and m.shape.length > 0}
    has_lora = any(isinstance(m, LoraLayer) for m in model.modules())
    not_included, warnings = ["the base weights (load them from base.name_or_path; check base.sha256)"], []
    if others:
        not_included.append(f"the prefixes of {', '.join(others)} ({', '.join(f'{t}: {n}' for t, n in others.items())}"
                            "): PEFT's prefix tuning reaches attention through past_key_values, which the Q-Former "
                            "and the vision encoder do not take; there is no PEFT counterpart")
    if has_lora:
        not_included.append("the LoRA weights (export them with --peft)")
    if model.positions != "shift":
        not_included.append("positions=keep: PEFT numbers the real tokens P..P+L-1 (and offsets given position_ids "
                            "by P); its forward reproduces this prefix only with position_ids = keep positions - P")
    if others or has_lora or model.positions != "shift":
        warnings.append("PeftModel.from_pretrained with this adapter does NOT reproduce the trained model on its "
                        "own (see not_included); use ptscale.from_pretrained on a --merged export")
    is_blip2 = model.base.config.model_type == "blip-2"
    if is_blip2:
        target = "blip2.language_model"
        peft_load = (f"blip2 = {type(model.base).__name__}.from_pretrained(BASE); blip2.language_model = "
                     f"PeftModel.from_pretrained(blip2.language_model, {str(out)!r})")
        not_included.append("AutoPeftModelForCausalLM cannot load it (the base is a BLIP-2 directory): attach it to "
                            "the BLIP-2 model's language_model. That reproduces the forward pass; generate() through "
                            "it fails in peft 0.21.2 (no generation from inputs_embeds): generate with "
                            "ptscale.from_pretrained or a --merged export's DynamicCache route")
    else:
        target = f"{lm_cls}.from_pretrained(BASE)"
        peft_load = f"PeftModel.from_pretrained({target}, {str(out)!r})  # or AutoPeftModelForCausalLM"
    manifest = _manifest(
        "peft-prefix", model, files={"adapter_config.json": "PEFT prefix-tuning config (prefix_projection=False)",
                                     PEFT_WEIGHTS: "prompt_embeddings: the folded language-model prefix"},
        base=base_info(model, base_model_name_or_path, base_digest), needs_base=True,
        reproduces={"peft.PeftModel.from_pretrained": not warnings, "ptscale.from_pretrained": not warnings},
        not_included=not_included, warnings=warnings, source=source,
        load={"peft": peft_load,
              "ptscale": f"ptscale.from_pretrained({str(out)!r})  # the language-model prefix only"})
    manifest["prefixes"]["included"] = [LM_TARGET]
    write_manifest(out, manifest)
    return out
