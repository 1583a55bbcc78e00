"""Non-finite losses: skipped and counted; too many in a row stop the run with a clear message."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from ptscale.checkpoint import Progress
from ptscale.config import RunConfig
from ptscale.training.recipe import NonFiniteLossError, PTPEFTRecipe


@pytest.fixture(scope="module", autouse=True)
def process_group():
    if not dist.is_initialized():
        # A TCP store passed directly: no MASTER_* variables leak into later tests' subprocesses.
        store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield


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


def _recipe(tmp_path, max_in_row=3):
    r = PTPEFTRecipe.__new__(PTPEFTRecipe)
    r.cfg = RunConfig(max_nonfinite_in_row=max_in_row)
    r.cfg.checkpoint.every_steps = 0
    r.model = torch.nn.Linear(1, 1)
    r.progress = Progress(stage_index=0)
    r.results = []
    r.dist = SimpleNamespace(is_main=False, world_size=1, rank=0)
    r.logger = SimpleNamespace(log=lambda *a: None)
    r.run_dir = tmp_path
    r.cache = None
    return r


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    r = _recipe(tmp_path)
    engine = FakeEngine([1.0, float("nan"), float("inf"), 1.0, 1.0, 1.0])
    loader = FakeLoader([{"input_ids": torch.zeros(1, 2)}] * 6)
    r._train_steps(engine, loader, steps=4, name="s", index=0)
    assert r.progress.step == 4 and r.progress.nonfinite_skipped == 2 and engine.backwards == 4


def test_too_many_in_a_row_stop_with_a_message(tmp_path):
    r = _recipe(tmp_path, max_in_row=3)
    engine = FakeEngine([1.0, float("nan"), float("nan"), float("nan"), 1.0])
    loader = FakeLoader([{"input_ids": torch.zeros(1, 2)}] * 5)
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row .* No sound checkpoint exists"):
        r._train_steps(engine, loader, steps=4, name="s", index=0)


def test_the_stop_names_the_newest_sound_checkpoint_not_a_poisoned_one(tmp_path):
    from ptscale.checkpoint import write_checkpoint

    sound = write_checkpoint(tmp_path / "checkpoints", Progress(step=2), {"w": torch.ones(2)}, None, keep_last=10)
    poisoned = write_checkpoint(tmp_path / "checkpoints", Progress(step=4), {"w": torch.ones(2)},
                                {"w::exp_avg_sq": torch.ones(2)}, keep_last=10)
    (poisoned / "tuned.safetensors").write_bytes(b"torn")  # unreadable: not sound
    r = _recipe(tmp_path, max_in_row=2)
    engine = FakeEngine([float("nan"), float("nan")])
    loader = FakeLoader([{"input_ids": torch.zeros(1, 2)}] * 2)
    with pytest.raises(NonFiniteLossError, match=f"newest sound checkpoint is {sound}"):
        r._train_steps(engine, loader, steps=4, name="s", index=0)
