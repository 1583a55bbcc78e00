"""Run directories: where a run lives, what it was, and what a resume may change.

A run directory holds ``recipe.yaml`` (the fully resolved recipe: the source of truth on resume),
``run.json`` (the plan, seed and the backbone's identity), checkpoints, stage weights, results and logs.
This module decides, before anything is built or written, which directory a command means and whether a
resume keeps the run what it was.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from ptscale.config import MAPPING_SETTINGS, RunConfig, load_recipe, to_dict
from ptscale.errors import RecipeError, RunDirError
from ptscale.version import __version__

RECIPE_FILE = "recipe.yaml"
RUN_INFO_FILE = "run.json"
CHECKPOINTS = "checkpoints"
CKPT_PREFIX = "ckpt-"

# Keys a resume may change: how the run is evaluated, logged and checkpointed, never what it trains.
MAY_CHANGE_ON_RESUME = ("eval", "checkpoint", "feature_cache", "log_every", "output_dir", "run_name",
                        "data.eval_size", "check_frozen", "max_nonfinite_in_row")


@dataclass
class Resume:
    run_dir: Path
    checkpoint: Path | None  # None: the run has no complete checkpoint (start it again in place)


def load_run_recipe(run_dir: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """A run directory's saved recipe: every key was resolved when the run started, so none counts as chosen
    for the plan (older runs saved their recipes without the resolved-recipe header). Settings whose default
    changed since are pinned to what the run trained with (``legacy_settings``)."""
    path = Path(run_dir) / RECIPE_FILE
    cfg = load_recipe(path, overrides, user_file=False)
    for key, value in legacy_settings(path).items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    return cfg


def legacy_settings(recipe: Path) -> dict[str, object]:
    """A recipe.yaml without ``prefix.positions`` predates the option, when the real tokens kept positions
    0..L-1 (the default is now ``shift``)."""
    raw = yaml.safe_load(recipe.read_text()) or {}
    prefix = raw.get("prefix") if isinstance(raw, dict) else None
    return {"prefix.positions": "keep"} if isinstance(prefix, dict) and "positions" not in prefix else {}


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a directory only carries the ckpt- name once it is complete)."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX))


def find_resume(resume: str, output_dir: str, run_name: str | None) -> Resume | None:
    """``--resume auto``: the named run (run_name) or the newest run with a checkpoint under output_dir; None
    when there is none (the caller says so and starts fresh). ``--resume DIR``: a run directory or one of its
    checkpoints; it must exist."""
    if resume == "auto":
        out = Path(output_dir)
        if run_name:
            run_dir = out / run_name
            if not (run_dir / RECIPE_FILE).is_file():
                return None
            return Resume(run_dir, (complete_checkpoints(run_dir) or [None])[-1])
        runs = [p for p in out.glob("*") if complete_checkpoints(p)]
        if not runs:
            return None
        run_dir = max(runs, key=lambda p: complete_checkpoints(p)[-1].stat().st_mtime)
        return Resume(run_dir, complete_checkpoints(run_dir)[-1])
    path = Path(resume)
    if (path / "progress.json").is_file() and path.parent.name == CHECKPOINTS:
        return Resume(path.parent.parent, path)
    if (path / RECIPE_FILE).is_file():
        found = complete_checkpoints(path)
        if not found:
            raise RunDirError(f"--resume {path}: the run has no complete checkpoint yet; start it again with "
                              f"--resume auto output_dir={path.parent} run_name={path.name}")
        return Resume(path, found[-1])
    if not path.exists():
        raise RunDirError(f"--resume {path}: no such directory; give a run directory, one of its "
                          "checkpoints/ckpt-* directories, or auto")
    raise RunDirError(f"--resume {path}: neither a run directory (no {RECIPE_FILE}) nor a checkpoint directory "
                      "(no progress.json); give RUN_DIR or RUN_DIR/checkpoints/ckpt-*")


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    """Dotted keys; a mapping-valued setting (prefix.lengths, lora.targets) is compared as one value."""
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k not in MAPPING_SETTINGS:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _may_change(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in MAY_CHANGE_ON_RESUME)


def _stage_summary(stage: dict | None) -> str:
    return "(absent)" if stage is None else f"{stage['name']} trains {'+'.join(stage['train'])}"


def resume_differences(saved: RunConfig, new: RunConfig) -> list[str]:
    """``key: old -> new`` for every training setting a resume would change."""
    a, b = to_dict(saved), to_dict(new)
    sa, sb = a.pop("stages"), b.pop("stages")
    a, b = _flatten(a), _flatten(b)
    out = [f"{key}: {a.get(key, '(absent)')!r} -> {b.get(key, '(absent)')!r}" for key in sorted(set(a) | set(b))
           if not _may_change(key) and a.get(key) != b.get(key)]
    for i in range(max(len(sa), len(sb))):
        x, y = (sa[i] if i < len(sa) else None), (sb[i] if i < len(sb) else None)
        if x is None or y is None:
            out.append(f"stages.{i}: {_stage_summary(x)} -> {_stage_summary(y)}")
            continue
        out += [f"stages.{i}.{k}: {x[k]!r} -> {y[k]!r}" for k in x if x[k] != y[k]]
    return out


def resumed_recipe(run_dir: Path, recipe: str | None, overrides: list[str]) -> RunConfig:
    """The recipe a resume runs: the run's saved recipe with the allowed overrides; a change to what the run
    trains is refused, naming every differing key with its old and new value."""
    saved = load_run_recipe(run_dir)
    new = load_recipe(recipe, overrides) if recipe else load_run_recipe(run_dir, overrides)
    if diffs := resume_differences(saved, new):
        raise RecipeError(f"--resume {run_dir}: the resume would change what the run trains; start a new run "
                          f"instead (a new run_name), or drop these settings: {'; '.join(diffs)} (a resume may "
                          f"change only {', '.join(MAY_CHANGE_ON_RESUME)})")
    new.output_dir, new.run_name = str(run_dir.parent), run_dir.name
    return new


def check_output_dir(cfg: RunConfig) -> None:
    """output_dir can hold the run: its nearest existing ancestor is a writable directory (checked on every rank
    before anything starts, so no rank fails alone while creating it)."""
    path = Path(cfg.output_dir).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise RecipeError(f"output_dir {cfg.output_dir}: {existing} is a file, not a directory; choose another "
                          "output_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RecipeError(f"output_dir {cfg.output_dir}: {existing} is not writable; choose another output_dir")


def check_run_name_free(cfg: RunConfig) -> None:
    """A fresh run never writes into another run's directory (its checkpoints would mix with the new ones)."""
    if cfg.run_name and (path := Path(cfg.output_dir) / cfg.run_name / RECIPE_FILE).exists():
        raise RunDirError(f"{path.parent}: a run already lives there; continue it with --resume {path.parent}, "
                          "or give another run_name")


def new_run_dir(cfg: RunConfig) -> Path:
    """A fresh run's directory: output_dir/run_name, or a timestamp (suffixed when two runs start in one second)."""
    check_run_name_free(cfg)
    base = Path(cfg.output_dir) / (cfg.run_name or time.strftime("%Y%m%d-%H%M%S"))
    run_dir, n = base, 0
    while cfg.run_name is None and run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    return run_dir


def read_run_info(run_dir: Path) -> dict:
    path = Path(run_dir) / RUN_INFO_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def run_info(cfg: RunConfig, backbone_identity: dict[str, str]) -> dict:
    return {"plan": cfg.plan, "seed": cfg.seed, "backbone": backbone_identity, "ptscale_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "user": os.environ.get("USER", "")}


def check_backbone(run_dir: Path, identity: dict[str, str], what: str) -> None:
    """The backbone a run trained on must be the one it is resumed or evaluated on."""
    recorded = read_run_info(run_dir).get("backbone")
    if recorded and recorded.get("digest") != identity.get("digest"):
        raise RecipeError(f"{what} {run_dir}: its backbone changed since the run started (was "
                          f"{recorded.get('source')} sha256 {str(recorded.get('digest'))[:12]}, now "
                          f"{identity.get('source')} sha256 {str(identity.get('digest'))[:12]}); use the original "
                          "weights (model.path or the cached default it was trained on)")


def open_run_dir(cfg: RunConfig, resume: Resume | None, backbone_identity: dict[str, str]) -> Path:
    """Rank 0: create the run directory (or reopen the resumed one) and write the resolved recipe (a resume's
    allowed changes included) and, once, run.json."""
    from ptscale.checkpoint import write_text_atomic  # torch: not before the recipe is read (this module is)
    from ptscale.config import dump_recipe

    run_dir = resume.run_dir if resume is not None else new_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / RECIPE_FILE, dump_recipe(cfg))
    if not (run_dir / RUN_INFO_FILE).is_file():
        write_text_atomic(run_dir / RUN_INFO_FILE, json.dumps(run_info(cfg, backbone_identity), indent=1))
    return run_dir
