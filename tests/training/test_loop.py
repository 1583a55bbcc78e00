"""One stage's loop: non-finite losses skipped and counted; too many in a row stop the run with a clear message
naming the newest sound checkpoint."""

import math
import signal
from types import SimpleNamespace

import pytest
import torch

from ptscale.checkpoint import Progress
from ptscale.dist import ALONE
from ptscale.errors import RunInterrupted
from ptscale.training.checkpoints import RunCheckpoints
from ptscale.training.loop import LoopSettings, NonFiniteLossError, StageLoop


class FakeEngine:
    device = torch.device("cpu")

    def __init__(self, losses):
        self.losses = iter(losses)
        self.backwards = 0

    def __call__(self, **batch):
        return SimpleNamespace(loss=torch.tensor(next(self.losses)))

    def backward(self, loss):
        assert math.isfinite(loss.item()), "a non-finite loss reached backward"
        self.backwards += 1

    def step(self):
        pass

    def is_gradient_accumulation_boundary(self):
        return True

    def get_lr(self):
        return [0.1]



class FakeLoader(list):
    batch_size = 1
    sampler = SimpleNamespace(set_epoch=lambda e: None, skip=0)


def _loop(tmp_path, engine, batches: int, steps: int, max_in_row=3) -> StageLoop:
    checkpoints = RunCheckpoints(tmp_path, ALONE, keep_last=10, log=lambda *a: None)
    loader = FakeLoader([{"input_ids": torch.zeros(1, 2)}] * batches)
    settings = LoopSettings(max_nonfinite_in_row=max_in_row, log_every=1, checkpoint_every=0, train_split="train",
                            data_name="synthetic")
    return StageLoop(engine, loader, steps, "s", 0, Progress(stage_index=0), settings, ALONE, log=lambda *a: None,
                     checkpoint=lambda with_optimizer: None, sound_advice=checkpoints.sound_advice)


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    engine = FakeEngine([1.0, float("nan"), float("inf"), 1.0, 1.0, 1.0])
    loop = _loop(tmp_path, engine, batches=6, steps=4)
    loop.run(torch.nn.Linear(1, 1))
    assert loop.progress.step == 4 and loop.progress.nonfinite_skipped == 2 and engine.backwards == 4


def test_too_many_in_a_row_stop_with_a_message(tmp_path):
    engine = FakeEngine([1.0, float("nan"), float("nan"), float("nan"), 1.0])
    loop = _loop(tmp_path, engine, batches=5, steps=4, max_in_row=3)
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row .* No sound checkpoint exists"):
        loop.run(torch.nn.Linear(1, 1))


def test_the_stop_names_the_newest_sound_checkpoint_not_a_poisoned_one(tmp_path):
    from ptscale.checkpoint import write_checkpoint

    sound = write_checkpoint(tmp_path / "checkpoints", Progress(step=2), {"w": torch.ones(2)}, None, keep_last=10)
    poisoned = write_checkpoint(tmp_path / "checkpoints", Progress(step=4), {"w": torch.ones(2)},
                                {"w::exp_avg_sq": torch.ones(2)}, keep_last=10)
    (poisoned / "tuned.safetensors").write_bytes(b"torn")  # unreadable: not sound
    engine = FakeEngine([float("nan"), float("nan")])
    loop = _loop(tmp_path, engine, batches=2, steps=4, max_in_row=2)
    with pytest.raises(NonFiniteLossError, match=f"newest sound checkpoint is {sound}"):
        loop.run(torch.nn.Linear(1, 1))


def test_a_stop_request_checkpoints_with_the_optimizer_at_the_step_boundary_then_stops(tmp_path):
    engine = FakeEngine([1.0] * 5)
    loop = _loop(tmp_path, engine, batches=5, steps=5)
    saved = []
    loop.checkpoint = lambda with_optimizer: saved.append((loop.progress.step, with_optimizer))
    loop.stop.signum = signal.SIGTERM  # as the handler leaves it when the signal arrives mid-step
    with pytest.raises(RunInterrupted) as stopped:
        loop.run(torch.nn.Linear(1, 1))
    assert stopped.value.signum == signal.SIGTERM
    assert saved == [(1, True)] and engine.backwards == 1  # the step finished, then one checkpoint, then the stop


def test_periodic_checkpoints_mid_stage_only(tmp_path):
    engine = FakeEngine([1.0] * 6)
    loop = _loop(tmp_path, engine, batches=6, steps=6)
    loop.settings.checkpoint_every = 2
    saved = []
    loop.checkpoint = lambda with_optimizer: saved.append((loop.progress.step, with_optimizer))
    loop.run(torch.nn.Linear(1, 1))
    assert saved == [(2, True), (4, True)]  # the stage end's checkpoint is the recipe's (after its evaluation)
