"""Checkpoint files without DeepSpeed: round trip, atomic publication, keep_last, refusal of non-finite
state, read and write failures as one CheckpointError naming the file and the fix, and the umask's modes."""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ptscale import checkpoint as ck
from ptscale.checkpoint import (
    CheckpointError,
    NonFiniteCheckpointError,
    Progress,
    list_checkpoints,
    newest_sound_checkpoint,
    read_checkpoint,
    save_safetensors_atomic,
    write_checkpoint,
    write_text_atomic,
)


def _state(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    tuned = {"prefix.text.weight": torch.randn(4, 3, generator=g), "lora.A": torch.randn(2, 5, generator=g)}
    optimizer = {f"{n}::{k}": torch.rand(t.shape, generator=g) for n, t in tuned.items()
                 for k in ("exp_avg", "exp_avg_sq")}
    return tuned, optimizer


def _write(root: Path, step: int, keep_last: int = 0, stage: int = 0, **kw) -> Path:
    tuned, optimizer = _state(step)
    progress = Progress(stage_index=stage, step=step, results=[{"point": "x", "metrics": {"CIDEr": 0.5}}])
    return write_checkpoint(root, progress, kw.get("tuned", tuned), kw.get("optimizer", optimizer), keep_last)


def _names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_round_trip(tmp_path: Path) -> None:
    tuned, optimizer = _state(3)
    progress = Progress(stage_index=1, step=3, epoch=2, batch_in_epoch=5, samples=40, world_size=2,
                        scheduler={"last_epoch": 3}, optimizer_step=3, rng=[{"a": [1, 2]}],
                        results=[{"point": "before training"}])
    path = write_checkpoint(tmp_path, progress, tuned, optimizer, keep_last=2)
    assert path == tmp_path / "ckpt-01-0000003"
    got_progress, got_tuned, got_optimizer = read_checkpoint(path)
    assert got_progress == progress
    # Pure data movement (serialise, read back): bit-exact by construction.
    assert got_tuned.keys() == tuned.keys() and all(torch.equal(got_tuned[k], tuned[k]) for k in tuned)
    assert got_optimizer is not None and all(torch.equal(got_optimizer[k], optimizer[k]) for k in optimizer)


def test_stage_boundary_checkpoint_has_no_optimizer(tmp_path: Path) -> None:
    tuned, _ = _state()
    path = write_checkpoint(tmp_path, Progress(stage_index=1), tuned, None, keep_last=0)
    assert not (path / "optimizer.safetensors").exists()
    assert read_checkpoint(path)[2] is None


def test_failure_mid_write_leaves_nothing_and_older_intact(tmp_path: Path, monkeypatch) -> None:
    older = _write(tmp_path, 1)
    calls = []

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # tuned written, optimizer fails half way
            Path(filename).write_bytes(b"half")
            raise OSError(errno.EIO, "Input/output error")
        return real_save(tensors, filename, metadata=metadata)

    real_save = ck.save_file
    monkeypatch.setattr(ck, "save_file", failing_save)
    with pytest.raises(CheckpointError, match="older checkpoints are intact"):
        _write(tmp_path, 2)
    assert _names(tmp_path) == [older.name]  # no ckpt-..-0000002, no .tmp- directory
    read_checkpoint(older)


def test_disk_full_is_one_checkpoint_error(tmp_path: Path, monkeypatch) -> None:
    older = _write(tmp_path, 1)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(CheckpointError) as info:
        _write(tmp_path, 2)
    message = str(info.value)
    assert f"disk full while writing checkpoint under {tmp_path}" in message
    assert "free space and resume with --resume auto" in message and "older checkpoints are intact" in message
    assert _names(tmp_path) == [older.name]


def test_disk_full_reported_by_safetensors_itself(tmp_path: Path, monkeypatch) -> None:
    """safetensors' Rust writer reports ENOSPC as a SafetensorError carrying the OS message."""

    def full(*args, **kwargs):
        raise ck.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                 'message: "No space left on device" })')

    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(CheckpointError, match="disk full while writing checkpoint"):
        _write(tmp_path, 1)
    assert _names(tmp_path) == []


def test_atomic_file_write_failure(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "results.json"
    target.write_text("old")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(CheckpointError, match=f"disk full while writing {tmp_path / 'w.safetensors'}"):
        save_safetensors_atomic({"a": torch.ones(2)}, tmp_path / "w.safetensors")
    assert _names(tmp_path) == ["results.json"]  # no temporary file left
    assert target.read_text() == "old"


def test_keep_last(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        _write(tmp_path, step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00-0000003", "ckpt-00-0000004"]
    for step in (5, 6):
        _write(tmp_path, step, keep_last=0)  # 0 keeps every checkpoint
    assert len(list_checkpoints(tmp_path)) == 4


def test_stale_temporary_of_a_killed_writer_is_removed(tmp_path: Path) -> None:
    (tmp_path / ".tmp-killed").mkdir()
    (tmp_path / ".tmp-killed" / "tuned.safetensors").write_bytes(b"partial")
    _write(tmp_path, 1)
    assert _names(tmp_path) == ["ckpt-00-0000001"]


def test_list_checkpoints_skips_incomplete_directories(tmp_path: Path) -> None:
    good = _write(tmp_path, 1)
    (tmp_path / "ckpt-00-0000009").mkdir()  # e.g. copied by hand, files missing
    assert list_checkpoints(tmp_path) == [good]
    assert list_checkpoints(tmp_path / "absent") == []


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_tensor_file_names_file_and_older_checkpoint(tmp_path: Path) -> None:
    older = _write(tmp_path, 1)
    newer = _write(tmp_path, 2)
    _truncate(newer / "tuned.safetensors")
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(newer)
    message = str(info.value)
    assert str(newer / "tuned.safetensors") in message
    assert f"delete {newer} to resume from an older one ({older})" in message


def test_truncated_only_checkpoint_advises_a_fresh_start(tmp_path: Path) -> None:
    only = _write(tmp_path, 1)
    _truncate(only / "optimizer.safetensors")
    with pytest.raises(CheckpointError, match=f"optimizer.safetensors cannot be read .*delete {only} and start "
                                              "fresh"):
        read_checkpoint(only)


def test_corrupt_progress_json(tmp_path: Path) -> None:
    path = _write(tmp_path, 1)
    (path / "progress.json").write_text('{"stage_index": 0, "ste')
    with pytest.raises(CheckpointError, match="progress.json cannot be read"):
        read_checkpoint(path)


@pytest.mark.parametrize("where", ["tuned", "optimizer"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_state_is_refused_before_anything_is_written(tmp_path: Path, where: str, bad: float) -> None:
    older = _write(tmp_path, 1)
    tuned, optimizer = _state(2)
    target = tuned if where == "tuned" else optimizer
    name = sorted(target)[-1]
    target[name][0, 0] = bad
    with pytest.raises(NonFiniteCheckpointError) as info:
        _write(tmp_path, 2, tuned=tuned, optimizer=optimizer)
    assert repr(name) in str(info.value) and "older checkpoints" in str(info.value)
    assert isinstance(info.value, CheckpointError)
    assert _names(tmp_path) == [older.name]


def test_newest_sound_checkpoint(tmp_path: Path) -> None:
    assert newest_sound_checkpoint(tmp_path) is None
    first = _write(tmp_path, 1)
    second = _write(tmp_path, 2)
    third = _write(tmp_path, 3)
    assert newest_sound_checkpoint(tmp_path) == third
    _truncate(third / "tuned.safetensors")
    assert newest_sound_checkpoint(tmp_path) == second
    # A checkpoint written before the non-finite guard existed (or edited since) holding a NaN moment.
    moments = ck.load_file(second / "optimizer.safetensors")
    moments[sorted(moments)[0]][0] = float("nan")
    ck.save_file(moments, second / "optimizer.safetensors")
    assert newest_sound_checkpoint(tmp_path) == first


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_get_the_users_umask(tmp_path: Path, umask_022: None) -> None:
    ckpt = _write(tmp_path / "checkpoints", 1)
    assert _mode(ckpt) == 0o755
    assert {f.name: _mode(f) for f in ckpt.iterdir()} == {
        "tuned.safetensors": 0o644, "optimizer.safetensors": 0o644, "progress.json": 0o644}
    write_text_atomic(tmp_path / "run" / "results.json", json.dumps({"evaluations": []}))
    save_safetensors_atomic({"w": torch.ones(2)}, tmp_path / "run" / "stage1" / "trainable.safetensors")
    assert _mode(tmp_path / "run" / "results.json") == 0o644
    assert _mode(tmp_path / "run" / "stage1" / "trainable.safetensors") == 0o644


def test_a_stricter_umask_is_kept(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        write_text_atomic(tmp_path / "captions-x.json", "[]")
        ckpt = _write(tmp_path, 1)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "captions-x.json") == 0o600
    assert _mode(ckpt) == 0o700 and _mode(ckpt / "progress.json") == 0o600
    assert ck.current_umask() == old  # reading the umask left it as it was


def test_apply_umask_opens_a_privately_written_tree(tmp_path: Path, umask_022: None) -> None:
    """What save_pretrained leaves (safetensors files are 0600 whatever the umask) inside a mkdtemp (0700)."""
    tree = Path(ck.tempfile.mkdtemp(dir=tmp_path))
    (tree / "sub").mkdir(mode=0o700)
    ck.save_file({"w": torch.ones(2)}, tree / "sub" / "model.safetensors")
    os.chmod(tree / "sub" / "model.safetensors", 0o600)  # as safetensors 0.8 creates it, umask or not
    assert _mode(tree) == 0o700
    ck.apply_umask(tree)
    assert (_mode(tree), _mode(tree / "sub"), _mode(tree / "sub" / "model.safetensors")) == (0o755, 0o755, 0o644)
