"""Load a finished (or interrupted) run directory back into a model: recipe.yaml + the newest weights.

The newest checkpoint holds every parameter any stage trained (full fp32, name-keyed), so a run loads
without DeepSpeed and on any number of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ptscale.checkpoint import list_checkpoints, read_checkpoint
from ptscale.config import RunConfig, load_recipe
from ptscale.data.collate import CaptionCollator
from ptscale.models.backbone import Backbone, default_backbone_dir, is_complete, load_backbone
from ptscale.models.build import build_model
from ptscale.models.presets import uses_random_weights
from ptscale.prefix.model import PrefixTunedModel


@dataclass
class LoadedRun:
    run_dir: Path
    cfg: RunConfig
    backbone: Backbone
    model: PrefixTunedModel
    collator: CaptionCollator
    checkpoint: Path


def legacy_overrides(recipe: Path) -> list[str]:
    """Settings whose default changed since a run was saved, pinned to what that run trained with: a recipe.yaml
    without ``prefix.positions`` predates the option, when the real tokens kept positions 0..L-1."""
    raw = yaml.safe_load(recipe.read_text()) or {}
    prefix = raw.get("prefix") if isinstance(raw, dict) else None
    if isinstance(prefix, dict) and "positions" not in prefix:
        return ["prefix.positions=keep"]
    return []


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None, *, full_precision: bool = False) -> LoadedRun:
    """``full_precision``: load the base weights unquantised even when the run trained on a quantised base
    (``model.quantization``): exports merge and save against the original weights, as QLoRA does."""
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}: no recipe.yaml; point at a run directory written by launchers/train.py")
    cfg = load_recipe(run_dir / "recipe.yaml", legacy_overrides(run_dir / "recipe.yaml"))
    found = [Path(checkpoint)] if checkpoint else list_checkpoints(run_dir / "checkpoints")
    if not found:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint under checkpoints/ (was the run killed before "
                                "its first save?)")
    if uses_random_weights(cfg.model):
        raise ValueError(f"{run_dir}: the run trained on random weights (preset {cfg.model.preset}, no model.path); "
                         "they were never saved, so there is no base to reload. Train with model.path to evaluate "
                         "or export")
    backbone_dir = cfg.model.path or default_backbone_dir(cfg.model)
    if not cfg.model.path and not is_complete(Path(backbone_dir)):
        raise FileNotFoundError(f"the default backbone this run used ({backbone_dir}) is not in the cache; "
                                "run launchers/train.py once to build it, or set PTSCALE_CACHE")
    quantization = "none" if full_precision else cfg.model.quantization
    backbone = load_backbone(backbone_dir, cfg.model.dtype, quantization)
    model = build_model(cfg, backbone)
    _, tuned, _ = read_checkpoint(found[-1])
    params = dict(model.named_parameters())
    unknown = sorted(set(tuned) - set(params))
    if unknown:
        raise RuntimeError(f"{found[-1]} holds parameters the recipe's model lacks: {unknown[:5]}")
    with torch.no_grad():
        for name, value in tuned.items():
            params[name].copy_(value.to(params[name].dtype))
    model.eval()
    collator = CaptionCollator(backbone.image_processor, backbone.tokenizer, backbone.num_query_tokens,
                               backbone.image_token_id, prompt=cfg.data.prompt, max_text_len=cfg.data.max_text_len)
    return LoadedRun(run_dir, cfg, backbone, model, collator, found[-1])
