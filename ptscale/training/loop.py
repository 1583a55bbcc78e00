"""One stage's optimizer steps: batches in data order -> forward, backward, step; non-finite losses skipped and
counted, bad data counted per epoch, a stop request honoured at a step boundary, periodic checkpoints asked for.

The recipe builds one :class:`StageLoop` per stage (engine, loader, step budget) and reads its ``Progress`` back.
Every rank takes the same branch at each decision (``all_agree``): forward, backward and step are collectives
under ZeRO.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from ptscale.checkpoint import Progress
from ptscale.config import StageConfig
from ptscale.console import progress as progress_bar
from ptscale.data.bad_data import BadDataReport, Collated, EmptySplitError, collate_skipping
from ptscale.dist import DistInfo, all_agree, gather_objects
from ptscale.errors import RunInterrupted, TrainingStopped


class NonFiniteLossError(TrainingStopped):
    pass


class StopRequest:
    """SIGINT / SIGTERM: inside the training loop the run finishes its step, checkpoints and stops (every rank
    agrees at the step boundary); outside it (setup, evaluation), or at a second Ctrl-C, it stops at once.
    Under the deepspeed launcher a rank sees the terminal's SIGINT and then the launcher's SIGTERM: one stop."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.in_loop = False

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        again = self.signum is not None
        self.signum = self.signum or signum
        if not self.in_loop or (again and signum == signal.SIGINT):
            raise RunInterrupted(self.signum)


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start mid-epoch (resume: same data order, skipping consumed batches)."""

    skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self) -> int:
        return super().__len__() - self.skip


def make_loader(records: Sequence[dict], collate: Callable, stage: StageConfig, index: int, seed: int,
                world: DistInfo, skip_bad: bool) -> DataLoader:
    """Stage ``index``'s training batches: shuffled per stage and epoch, the last partial batch dropped, bad
    records skipped and counted when ``skip_bad`` (batches then carry their skip counts: ``Collated``)."""
    sampler = ResumableSampler(records, num_replicas=world.world_size, rank=world.rank, shuffle=True,
                               seed=seed + index, drop_last=True)
    # Its own generator: iterator creation must not draw from the global RNG, which resume restores.
    return DataLoader(records, batch_size=stage.batch_size, sampler=sampler,
                      collate_fn=collate_skipping(collate) if skip_bad else collate, drop_last=True,
                      generator=torch.Generator().manual_seed(seed))


@dataclass
class LoopSettings:
    """What the recipe decides for every stage's loop."""

    max_nonfinite_in_row: int
    log_every: int
    checkpoint_every: int  # 0: only at stage ends
    train_split: str  # named when every record of an epoch was bad
    data_name: str


@dataclass
class StageLoop:
    """``run()`` takes ``steps`` optimizer steps of ``engine`` over ``loader``, from where ``progress`` stands.

    ``checkpoint(with_optimizer)`` writes a checkpoint of the current state; ``sound_advice()`` names the newest
    checkpoint that reads back and is finite (said when the run stops on non-finite values); ``cached_images``
    swaps a batch's pixels for cached image embeddings (the vision-feature cache; the images' keys are given).
    """

    engine: object
    loader: DataLoader
    steps: int
    name: str
    index: int
    progress: Progress
    settings: LoopSettings
    world: DistInfo
    log: Callable[[int, dict], None]
    checkpoint: Callable[[bool], None]
    sound_advice: Callable[[], str]
    stop: StopRequest = field(default_factory=StopRequest)
    cached_images: Callable[[dict, list], dict] | None = None

    def run(self, model: nn.Module) -> None:
        model.train()
        bar = progress_bar(total=self.steps, initial=self.progress.step, desc=self.name, rank=self.world.rank)
        self.stop.in_loop = True
        try:
            self._epochs(bar)
        finally:
            self.stop.in_loop = False
            bar.close()

    def _epochs(self, bar: tqdm) -> None:
        p = self.progress
        self._t0, self._samples0, self._in_row = time.time(), p.samples, 0
        while p.step < self.steps:
            self.loader.sampler.set_epoch(p.epoch)
            self.loader.sampler.skip = p.batch_in_epoch * self.loader.batch_size
            epoch_report = BadDataReport()
            for batch in self.loader:
                if isinstance(batch, Collated):
                    batch, report = batch
                    epoch_report.merge(report)
                p.batch_in_epoch += 1
                loss = self._step(batch)
                if loss is None:
                    continue
                p.step += 1
                p.global_step += 1
                self._after_step(loss, bar)
                if p.step >= self.steps:
                    break
            else:
                p.epoch, p.batch_in_epoch = p.epoch + 1, 0
            self._report_bad_data(epoch_report)

    def _step(self, batch: dict | None) -> torch.Tensor | None:
        """Forward, backward and step on one micro-batch; its loss when an optimizer step completed. None: a batch
        empty on some rank (all items bad), a non-finite loss (skipped and counted), or inside accumulation."""
        if not all_agree(batch is not None):  # every rank skips a batch that is empty on any rank
            return None
        engine = self.engine
        keys = batch.pop("image_keys", None)
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        if self.cached_images is not None:
            batch = self.cached_images(batch, keys)
        loss = engine(**batch).loss
        if not all_agree(bool(torch.isfinite(loss.detach()).all())):
            self._skip_nonfinite()
            return None
        self._in_row = 0
        engine.backward(loss)
        engine.step()
        self.progress.samples += batch["input_ids"].shape[0] * self.world.world_size
        return loss if engine.is_gradient_accumulation_boundary() else None

    def _skip_nonfinite(self) -> None:
        p = self.progress
        p.nonfinite_skipped += 1
        self._in_row += 1
        self.log(p.global_step, {"kind": "nonfinite", "stage": self.name, "skipped": p.nonfinite_skipped})
        if self._in_row >= self.settings.max_nonfinite_in_row:
            raise NonFiniteLossError(f"[{self.name}] {self._in_row} non-finite losses in a row (step {p.step}); "
                                     f"stopping. {self.sound_advice()}")

    def _after_step(self, loss: torch.Tensor, bar: tqdm) -> None:
        """Progress, logging, a requested stop (every rank agrees at this boundary), periodic checkpoints."""
        p, s = self.progress, self.settings
        rate = (p.samples - self._samples0) / (time.time() - self._t0)
        bar.set_postfix(loss=f"{loss.item():.4f}", samples_s=f"{rate:.1f}")
        bar.update(1)
        if p.step % s.log_every == 0 or p.step == self.steps:
            self.log(p.global_step, {
                "kind": "train", "stage": self.name, "stage_index": self.index, "step": p.step, "loss": loss.item(),
                "lr": self.engine.get_lr()[0], "samples_per_s": rate, "epoch": p.epoch,
                "nonfinite_skipped": p.nonfinite_skipped})
        if not all_agree(self.stop.signum is None):  # a signal reached some rank
            self.checkpoint(True)
            raise RunInterrupted(self.stop.signum or signal.SIGTERM)
        if s.checkpoint_every and p.step % s.checkpoint_every == 0 and p.step < self.steps:
            self.checkpoint(True)

    def _report_bad_data(self, epoch_report: BadDataReport) -> None:
        """Counted at each epoch end (all ranks summed); never a silent zero-length epoch."""
        total = BadDataReport.merged(gather_objects(epoch_report))
        if not total.counts:
            return
        if self.world.is_main:
            tqdm.write(f"[{self.name}] skipped bad data this epoch: {total.summary()}")
        self.log(self.progress.global_step, {"kind": "bad_data", "stage": self.name, **total.counts})
        if total.kept == 0:
            raise EmptySplitError(self.settings.train_split, self.settings.data_name, "every example was skipped")
