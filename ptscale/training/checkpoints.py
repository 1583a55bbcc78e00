"""A run's checkpoints and stage outputs: gathered over ranks, checked finite, written atomically by rank 0.

Every rank gathers and checks the same values, so a non-finite weight or Adam moment stops every rank together
and nothing is written from it; the stop names the newest checkpoint that reads back and is finite.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ptscale.checkpoint import (
    Progress,
    first_nonfinite,
    newest_sound_checkpoint,
    rng_state,
    save_safetensors_atomic,
    write_checkpoint,
    write_text_atomic,
)
from ptscale.dist import DistInfo, barrier, gather_objects
from ptscale.models.groups import group_of
from ptscale.training import engine as ds
from ptscale.training.loop import NonFiniteLossError


@dataclass
class RunCheckpoints:
    run_dir: Path
    world: DistInfo
    keep_last: int
    log: Callable[[int, dict], None]

    @property
    def directory(self) -> Path:
        return self.run_dir / "checkpoints"

    def save(self, engine, model: nn.Module, progress: Progress, trained_groups: Iterable[str], index: int,
             label: str, *, with_optimizer: bool) -> Path | None:
        """The trained groups' fp32 values (all of them so far, not only this stage's), the Adam moments when
        ``with_optimizer`` (mid-stage), ``progress`` and every rank's RNG state. Rank 0 returns the path."""
        trained = set(trained_groups)
        names = {n for n, _ in model.named_parameters() if group_of(n) in trained}
        tuned = ds.gather_state(model, names)
        tuned.update(ds.trainable_fp32(engine))  # fp32 masters, not the (maybe bf16) module copies
        optimizer = None
        if with_optimizer:
            optimizer, progress.optimizer_step = ds.get_optimizer_state(engine)
            progress.scheduler = engine.lr_scheduler.state_dict()
        if bad := first_nonfinite(tuned) or first_nonfinite(optimizer or {}):
            raise NonFiniteLossError(f"[{label}] {bad[0]} is not finite at step {progress.step} ({bad[1]:,} of "
                                     f"{bad[2]:,} values): no checkpoint written. {self.sound_advice()}")
        progress.rng = gather_objects(rng_state())
        progress.world_size = self.world.world_size
        path = None
        if self.world.is_main:
            path = write_checkpoint(self.directory, progress, tuned, optimizer, self.keep_last)
            self.log(progress.global_step, {"kind": "checkpoint", "stage_index": index, "path": str(path)})
        barrier()
        return path

    def save_stage(self, engine, index: int, name: str, groups: list[str], digests: tuple[dict, dict]) -> None:
        """``stage-<i>-<name>/trainable.safetensors`` (what the stage trained, fp32) and, when the frozen check
        ran, the parameter digests before and after it."""
        weights = ds.trainable_fp32(engine)
        before, after = digests
        if self.world.is_main:
            stage_dir = self.run_dir / f"stage-{index + 1}-{name}"
            stage_dir.mkdir(parents=True, exist_ok=True)
            save_safetensors_atomic(weights, stage_dir / "trainable.safetensors",
                                    metadata={"stage": name, "groups": ",".join(groups)})
            if before:
                write_text_atomic(stage_dir / "param_digests.json", json.dumps({"before": before, "after": after}))
        barrier()

    def sound_advice(self) -> str:
        sound = newest_sound_checkpoint(self.directory)
        if sound is None:
            return "No sound checkpoint exists: lower the learning rate and start a new run"
        return (f"The newest sound checkpoint is {sound}: lower the learning rate (a resume keeps the recipe, so "
                f"start a new run) or resume from it with --resume {sound}")
