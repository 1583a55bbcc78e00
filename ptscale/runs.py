"""Load a finished (or interrupted) run directory back into a model: recipe.yaml + the newest weights.

The newest checkpoint holds every parameter any stage trained (full fp32, name-keyed), so a run loads
without DeepSpeed and on any number of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ptscale.checkpoint import list_checkpoints, read_checkpoint
from ptscale.config import RunConfig
from ptscale.data.collate import CaptionCollator, make_collator
from ptscale.dist import gathered
from ptscale.errors import RecipeError, RunDirError
from ptscale.models.backbone import Backbone, backbone_digest, default_backbone_dir, is_complete, load_backbone
from ptscale.models.build import build_model
from ptscale.models.presets import uses_random_weights
from ptscale.plans import prefixes_active
from ptscale.prefix.model import PrefixTunedModel
from ptscale.rundir import RECIPE_FILE, check_backbone, load_run_recipe


@dataclass
class LoadedRun:
    run_dir: Path
    cfg: RunConfig
    backbone: Backbone
    model: PrefixTunedModel
    collator: CaptionCollator
    checkpoint: Path


def load_trained_weights(model: torch.nn.Module, tuned: dict[str, torch.Tensor], source: Path) -> None:
    """Copy a checkpoint's trained parameters (full fp32, by name) into a model built from the same recipe; also
    into ZeRO-3 partitions (gathered; every rank read the same file, rank 0's write is kept)."""
    params = dict(model.named_parameters())
    unknown = sorted(set(tuned) - set(params))
    if unknown:
        raise RecipeError(f"{source} holds parameters this recipe's model lacks: {unknown[:5]}; load it with the "
                          "recipe that wrote it")
    with torch.no_grad():
        for name, value in tuned.items():
            with gathered([params[name]], modifier_rank=0):
                params[name].copy_(value.to(params[name].dtype))


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None, *, full_precision: bool = False) -> LoadedRun:
    """``full_precision``: load the base weights unquantised even when the run trained on a quantised base
    (``model.quantization``): exports merge and save against the original weights, as QLoRA does."""
    run_dir = Path(run_dir)
    if not (run_dir / RECIPE_FILE).is_file():
        what = "no such directory" if not run_dir.exists() else f"no {RECIPE_FILE} there"
        raise RunDirError(f"{run_dir}: {what}; point at a run directory written by launchers/train.py")
    cfg = load_run_recipe(run_dir)
    found = [Path(checkpoint)] if checkpoint else list_checkpoints(run_dir / "checkpoints")
    if not found:
        raise RunDirError(f"{run_dir}: no complete checkpoint under checkpoints/ (was the run killed before "
                          "its first save?)")
    if checkpoint and not (found[0] / "progress.json").is_file():
        raise RunDirError(f"{checkpoint}: not a checkpoint directory (no progress.json)")
    if uses_random_weights(cfg.model):
        raise RecipeError(f"{run_dir}: the run trained on random weights (preset {cfg.model.preset}, no model.path); "
                          "they were never saved, so there is no base to reload. Train with model.path to evaluate "
                          "or export")
    backbone_dir = cfg.model.path or default_backbone_dir(cfg.model)
    if not cfg.model.path and not is_complete(Path(backbone_dir)):
        raise RecipeError(f"the default backbone this run used ({backbone_dir}) is not in the cache; "
                          "run launchers/train.py once to build it, or set PTSCALE_CACHE")
    check_backbone(run_dir, {"source": str(backbone_dir), "digest": backbone_digest(backbone_dir)}, "run")
    quantization = "none" if full_precision else cfg.model.quantization
    backbone = load_backbone(backbone_dir, cfg.model.dtype, quantization, cfg.model.family or "blip2")
    model = build_model(cfg, backbone)
    progress, tuned, _ = read_checkpoint(found[-1])
    reached = progress.stage_index + (1 if progress.step > 0 else 0)  # stages begun when it was saved
    model.dormant = not prefixes_active(cfg.stages, reached - 1)
    load_trained_weights(model, tuned, found[-1])
    model.eval()
    collator = make_collator(backbone, cfg.data)
    return LoadedRun(run_dir, cfg, backbone, model, collator, found[-1])
