"""Checkpoints: atomic, world-size independent, resumable mid-stage.

A checkpoint is a directory ``checkpoints/ckpt-<stage>-<step>`` holding
- ``tuned.safetensors``: full fp32 values of every parameter any stage so far has trained (gathered:
  never ZeRO-3's (0,)-shaped shards), name-keyed;
- ``optimizer.safetensors``: the current stage's Adam moments per parameter name (absent at a stage
  boundary, where the next stage starts a fresh optimizer);
- ``progress.json``: stage, step, data position, scheduler state, RNG states per rank, results so far.
It is written to a temporary directory and renamed into place, so a crash mid-save leaves every older
checkpoint loadable; only complete directories ever carry the ``ckpt-`` name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PREFIX = "ckpt-"


@dataclass
class Progress:
    stage_index: int = 0  # the stage to run (or running)
    step: int = 0  # optimizer steps done in that stage
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed
    samples: int = 0
    nonfinite_skipped: int = 0
    global_step: int = 0  # optimizer steps since the run began, across stages (one timeline)
    world_size: int = 1
    scheduler: dict | None = None
    optimizer_step: int = 0
    rng: list = field(default_factory=list)  # per rank
    results: list = field(default_factory=list)


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def write_text_atomic(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    _atomic(path, write)


def rng_state() -> dict:
    import random

    import numpy as np

    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def _jsonable(obj):
    import numpy as np

    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, tuple):
        return [_jsonable(x) for x in obj]
    if isinstance(obj, list):
        return [_jsonable(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    return obj


def write_checkpoint(root: Path, progress: Progress, tuned: dict[str, torch.Tensor],
                     optimizer: dict[str, torch.Tensor] | None, keep_last: int) -> Path:
    """Rank 0 only. Returns the final directory."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{progress.stage_index:02d}-{progress.step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        save_file({k: v.contiguous() for k, v in tuned.items()}, tmp / "tuned.safetensors")
        if optimizer is not None:
            save_file({k: v.contiguous() for k, v in optimizer.items()}, tmp / "optimizer.safetensors")
        (tmp / "progress.json").write_text(json.dumps(_jsonable(asdict(progress))))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def read_checkpoint(path: Path) -> tuple[Progress, dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    try:
        progress = Progress(**json.loads((path / "progress.json").read_text()))
        tuned = load_file(path / "tuned.safetensors")
        opt_file = path / "optimizer.safetensors"
        optimizer = load_file(opt_file) if opt_file.exists() else None
    except (OSError, ValueError, TypeError) as e:
        raise RuntimeError(f"checkpoint {path} cannot be read ({e}); delete it to resume from an older one") from e
    return progress, tuned, optimizer


def first_nonfinite(tensors: dict[str, torch.Tensor] | None) -> str | None:
    """The name of the first tensor holding a NaN or an infinity (None: all finite)."""
    for name, t in (tensors or {}).items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def newest_sound_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint whose files read back and whose tensors are all finite."""
    for path in reversed(list_checkpoints(root)):
        try:
            _, tuned, optimizer = read_checkpoint(path)
        except RuntimeError:
            continue
        if first_nonfinite(tuned) is None and first_nonfinite(optimizer) is None:
            return path
    return None
