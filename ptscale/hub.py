"""``ptscale.from_pretrained(EXPORT_DIR)``: an exported model back, on CPU, without DeepSpeed.

Reads the export's ``manifest.json`` (``ptscale.tuners.export``) and returns a :class:`PrefixTunedModel`
(``.base`` is the transformers model; ``forward`` and ``generate`` take the transformers arguments) with every
prefix attached as static keys/values (no encoder) and the LoRA merged (``--merged``) or attached through PEFT
(``--peft``). A PEFT prefix-tuning adapter (ours or PEFT's own) loads too: its prefix becomes the
``language_model`` prefix, with PEFT's position convention (``positions=shift``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ptscale.config import RecipeError


class ExportLoadError(FileNotFoundError):
    """An export directory cannot be loaded as asked; the message says why (a FileNotFoundError so that the
    command line reports it as one line)."""


def _model_class(name: str):
    """The class an export's base was saved from: a transformers class, or one of ptscale's own models written for
    transformers (VinVL, OFA: transformers has none). Looked up by name in these two places only, never imported
    from a module the export names."""
    import transformers

    from ptscale.models.ofa import OFAModel
    from ptscale.models.vinvl import VinVLForCaptioning

    own = {c.__name__: c for c in (VinVLForCaptioning, OFAModel)}
    cls = getattr(transformers, name, None) or own.get(name)
    if cls is None:
        raise ExportLoadError(f"transformers has no class {name!r} (the export was made with another version?)")
    return cls


def _load_base(manifest: dict, base: Any, kwargs: dict):
    """The base model the export needs: ``base`` (a loaded model or a directory) or the recorded one, whose
    weights must match the recorded digest."""
    from ptscale.models.backbone import backbone_digest

    if isinstance(base, torch.nn.Module):
        return base
    info = manifest["base"]
    path = base if base is not None else info["name_or_path"]
    if path is None:
        raise ExportLoadError("the export does not record its base model; pass base=<directory or model>")
    if not Path(path).is_dir():
        raise ExportLoadError(f"base model {path} (recorded in the export) is not a local directory; pass "
                              "base=<directory or model>")
    if info.get("sha256") and backbone_digest(path) != info["sha256"]:
        raise ExportLoadError(f"base model {path}: its weights' sha256 is not the {info['sha256'][:12]}... the "
                              "export was made against; the prefixes and LoRA would be applied to other weights")
    return _model_class(info["class"]).from_pretrained(str(path), **kwargs)


def _wrap(base, out: Path, freeze_base: bool):
    from ptscale.config import PrefixConfig
    from ptscale.prefix.model import PrefixTunedModel
    from ptscale.prefix.saving import load_prefixes
    from ptscale.tuners.export import PREFIX_CONFIG_FILE, PREFIX_FILE

    if not (out / PREFIX_FILE).is_file():
        return PrefixTunedModel(base, PrefixConfig(lengths={}), freeze_base=freeze_base)
    cfg = json.loads((out / PREFIX_CONFIG_FILE).read_text())
    cfg.setdefault("positions", "keep")  # exports written before prefix.positions existed used keep
    model = PrefixTunedModel(base, PrefixConfig(**cfg), freeze_base=freeze_base)
    model.fold_prefixes()
    load_prefixes(model, out / PREFIX_FILE)  # checks kind, targets, folded state and shapes
    return model


def from_pretrained(path: str | Path, *, base: Any = None, freeze_base: bool = True, **from_pretrained_kwargs: Any):
    """The trained model of a ``ptscale export`` directory (``--merged`` or ``--peft``), or a PEFT prefix-tuning
    adapter directory, in eval mode.

    ``base``: the base model (a directory or a loaded model) for exports that need one (``--peft``, PEFT
    prefix adapters); default: the one recorded in the export, checked against its weights digest.
    ``from_pretrained_kwargs`` go to the transformers ``from_pretrained`` (e.g. ``dtype=torch.bfloat16``).
    """
    from ptscale.tuners.export import MANIFEST, NO_PREFIXES_DIR, WITH_PREFIXES_DIR, read_manifest

    out = Path(path)
    if not out.is_dir():
        raise ExportLoadError(f"{out}: no such export directory")
    if not (out / MANIFEST).is_file():
        adapter = out / "adapter_config.json"
        if adapter.is_file() and json.loads(adapter.read_text()).get("peft_type") == "PREFIX_TUNING":
            cfg = json.loads(adapter.read_text())
            manifest = {"export": "peft-prefix", "prefixes": {"positions": "shift"},
                        "base": {"name_or_path": cfg.get("base_model_name_or_path"), "sha256": None,
                                 "class": (cfg.get("auto_mapping") or {}).get("base_model_class")
                                 or "AutoModelForCausalLM"}}
        else:
            raise ExportLoadError(f"{out}: no {MANIFEST}; point at a directory written by ptscale export "
                                  "(--merged, --peft, --peft-prefix) or a PEFT prefix-tuning adapter")
    else:
        try:
            manifest = read_manifest(out)
        except ValueError as e:
            raise RecipeError(str(e)) from e
    kind = manifest["export"]
    if kind == "merged":
        sub = next((out / d for d in (WITH_PREFIXES_DIR, NO_PREFIXES_DIR) if (out / d).is_dir()), None)
        if sub is None:
            raise ExportLoadError(f"{out}: the merged model's folder ({WITH_PREFIXES_DIR}/ or {NO_PREFIXES_DIR}/) is "
                                  "missing")
        model = _wrap(_model_class(manifest["base"]["class"]).from_pretrained(str(sub), **from_pretrained_kwargs),
                      out, freeze_base)
    elif kind == "peft-lora":
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(_load_base(manifest, base, from_pretrained_kwargs), str(out))
        # the transformers model with the LoRA layers in place; PEFT's wrapper is not needed around it
        model = _wrap(peft_model.base_model.model, out, freeze_base)
    elif kind == "peft-prefix":
        from ptscale.prefix.peft_interop import prefixed_from_peft

        model = prefixed_from_peft(_load_base(manifest, base, from_pretrained_kwargs), out,
                                   positions=manifest["prefixes"]["positions"], freeze_base=freeze_base)
    else:
        raise ExportLoadError(f"{out}: export kind {kind!r} cannot be loaded as a model")
    return model.eval()
