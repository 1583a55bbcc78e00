"""Checkpoints: atomic, world-size independent, resumable mid-stage.

A checkpoint is a directory ``checkpoints/ckpt-<stage>-<step>`` holding
- ``tuned.safetensors``: full fp32 values of every parameter any stage so far has trained (gathered:
  never ZeRO-3's (0,)-shaped shards), name-keyed;
- ``optimizer.safetensors``: the current stage's Adam moments per parameter name (absent at a stage
  boundary, where the next stage starts a fresh optimizer);
- ``progress.json``: stage, step, data position, scheduler state, RNG states per rank, results so far.
It is written to a temporary directory and renamed into place, so a crash mid-save leaves every older
checkpoint loadable; only complete directories ever carry the ``ckpt-`` name.

Only finite weights and optimizer moments are ever written (a diverged run must not leave a "safe" checkpoint
of garbage behind), and every file and directory written here gets the user's umask: ``tempfile`` creates
them private (0600 / 0700) and they are opened up to ``0o666 & ~umask`` / ``0o777 & ~umask`` before the
rename that publishes them.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

PREFIX = "ckpt-"
TMP_PREFIX = ".tmp-"
REQUIRED_FILES = ("progress.json", "tuned.safetensors")  # present in every checkpoint write_checkpoint publishes
# What a failed write can raise: the OS's errors, and safetensors' own (its Rust writer reports I/O
# failures such as a full disk as SafetensorError, not OSError).
WRITE_ERRORS = (OSError, SafetensorError)
READ_ERRORS = (OSError, ValueError, TypeError, KeyError, SafetensorError)


class CheckpointError(RuntimeError):
    """A checkpoint (or another output file) that cannot be written or read back; the message names the
    file and the fix. A user-facing error: the CLI reports it in one line."""


class NonFiniteCheckpointError(CheckpointError):
    """Refusal to save weights or optimizer moments holding NaN or inf."""


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


def current_umask() -> int:
    """The process umask. POSIX has no read-only query: set a value and put the old one straight back."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def apply_umask(root: Path, umask: int | None = None) -> None:
    """Give ``root`` and everything under it the modes the umask allows (files 0o666 & ~umask, directories
    0o777 & ~umask). For trees written privately: tempfile's directories are 0700, and safetensors creates
    its files 0600 whatever the umask (so does every ``save_pretrained`` through it)."""
    umask = current_umask() if umask is None else umask
    root = Path(root)
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _disk_message(err: BaseException, what: str) -> str:
    full = (isinstance(err, OSError) and err.errno == errno.ENOSPC) or "No space left" in str(err) \
        or "os error 28" in str(err)
    return f"disk full while writing {what}" if full else f"cannot write {what} ({err})"


def _atomic(path: Path, write) -> None:
    """Write through a private temporary file in the same directory, give it the umask's mode, rename it
    into place: a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    mode = 0o666 & ~current_umask()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except WRITE_ERRORS as e:
        raise CheckpointError(f"{_disk_message(e, str(path))}; free space or fix the directory's permissions "
                              f"and run again (any older {path.name} is unchanged)") from e
    finally:
        if tmp is not None and os.path.exists(tmp):
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


def first_nonfinite(tensors: dict[str, torch.Tensor]) -> tuple[str, int, int] | None:
    """(name, non-finite count, size) of the first floating tensor holding NaN or inf, in key order."""
    for name in sorted(tensors):
        t = tensors[name]
        if t.is_floating_point() or t.is_complex():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                return name, bad, t.numel()
    return None


def checkpoint_name(progress: Progress) -> str:
    return f"{PREFIX}{progress.stage_index:02d}-{progress.step:07d}"


def write_checkpoint(root: Path, progress: Progress, tuned: dict[str, torch.Tensor],
                     optimizer: dict[str, torch.Tensor] | None, keep_last: int) -> Path:
    """Rank 0 only. Returns the final directory.

    Raises NonFiniteCheckpointError (nothing written) when a weight or moment is NaN/inf, and
    CheckpointError when the write fails (disk full, permissions); either way the temporary directory is
    gone and every older checkpoint is intact.
    """
    root = Path(root)
    final = root / checkpoint_name(progress)
    for kind, tensors in (("trained weight", tuned), ("optimizer moment", optimizer or {})):
        bad = first_nonfinite(tensors)
        if bad is not None:
            name, count, size = bad
            raise NonFiniteCheckpointError(
                f"refusing to write checkpoint {final}: {kind} {name!r} holds {count} non-finite values "
                f"(of {size}); nothing was written, the older checkpoints under {root} are intact")
    umask = current_umask()
    tmp: Path | None = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(root)
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=root))
        save_file({k: v.contiguous() for k, v in tuned.items()}, tmp / "tuned.safetensors")
        if optimizer is not None:
            save_file({k: v.contiguous() for k, v in optimizer.items()}, tmp / "optimizer.safetensors")
        (tmp / "progress.json").write_text(json.dumps(_jsonable(asdict(progress))))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        apply_umask(tmp, umask)  # mkdtemp made it 0700, safetensors its files 0600
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except WRITE_ERRORS as e:
        what = f"checkpoint under {root}"
        raise CheckpointError(f"{_disk_message(e, what)}; free space and resume with --resume auto; "
                              "older checkpoints are intact") from e
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _remove_stale_temporaries(root: Path) -> None:
    """Temporary directories of a writer that was killed mid-save (a crash cannot run ``finally``). Only
    rank 0 of the one run owning ``root`` writes here, so none of them is in use."""
    for p in root.glob(f"{TMP_PREFIX}*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (published by write_checkpoint, their files present), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                  and all((p / f).is_file() for f in REQUIRED_FILES))


def _older_than(path: Path) -> Path | None:
    older = [p for p in list_checkpoints(path.parent) if p.name < path.name]
    return older[-1] if older else None


def read_checkpoint(path: Path) -> tuple[Progress, dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Raises CheckpointError naming the unreadable file and the fix (the next older checkpoint, or a
    fresh start)."""
    path = Path(path)
    current = path / "progress.json"
    try:
        progress = Progress(**json.loads(current.read_text()))
        current = path / "tuned.safetensors"
        tuned = load_file(current)
        current = path / "optimizer.safetensors"
        optimizer = load_file(current) if current.exists() else None
    except READ_ERRORS as e:
        older = _older_than(path)
        fix = f"delete {path} to resume from an older one ({older})" if older is not None else \
            f"delete {path} and start fresh (no older complete checkpoint)"
        raise CheckpointError(f"checkpoint file {current} cannot be read ({e}); {fix}") from e
    return progress, tuned, optimizer


def is_sound(path: Path) -> bool:
    """The checkpoint's files read back and every weight and moment in them is finite."""
    try:
        _, tuned, optimizer = read_checkpoint(path)
    except CheckpointError:
        return False
    return first_nonfinite(tuned) is None and first_nonfinite(optimizer or {}) is None


def newest_sound_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint under ``root`` that is_sound (reads each candidate in full, newest first: for
    the error path, not for every step)."""
    for path in reversed(list_checkpoints(root)):
        if is_sound(path):
            return path
    return None


# --- checkpoints in a released layout (ptscale's own implementations of models transformers lacks) ---------------
def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint directory's ``model.safetensors``, else its ``pytorch_model.bin`` (``weights_only``)."""
    if (path / "model.safetensors").is_file():
        return load_file(path / "model.safetensors")
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin")


def load_exactly(model: torch.nn.Module, state: dict[str, torch.Tensor], may_lack: set[str], path: Path,
                 layout: str) -> None:
    """``state`` into ``model``, refusing a missing key (a silently random weight) other than ``may_lack`` (tied
    copies) and any key the model does not have, naming them; then the model's tied weights are tied again."""
    expected = set(model.state_dict())
    missing = sorted(expected - set(state) - may_lack)
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{path}: not {layout}: missing {missing[:4]}{' ...' if len(missing) > 4 else ''}, "
                         f"unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")
    model.load_state_dict(state, strict=False)
    model.tie_weights()
