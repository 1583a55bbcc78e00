"""The ground floor for distributed facts: who this rank is, and the few collectives every layer uses.

torch.distributed only (no DeepSpeed, which takes seconds to import): evaluation on one rank, the recipe and the
engine share these. The process group itself is made by ``training.engine.init_distributed``. ``gathered`` is
the one DeepSpeed call below the engine: it imports DeepSpeed only when a parameter is ZeRO-3 partitioned.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


ALONE = DistInfo(0, 1, 0)  # a world of one with no process group (plain python, tests, notebooks)


def free_port() -> str:
    """A TCP port nobody holds now (a launcher's default 29500 collides with any other run)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (itself without a process group)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_agree(ok: bool) -> bool:
    """True on every rank when ``ok`` holds on every rank (``ok`` itself without a process group): ranks that
    must take the same branch (forward, backward and step are collectives under ZeRO) decide together."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([float(ok)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order ([obj] without a process group)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def gathered(params: list[nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """Full ZeRO-3 parameters inside the block (a no-op without ZeRO-3). ``generate`` reads top-level
    parameters (BLIP-2's query_tokens) outside any module forward, where ZeRO-3's hooks would not gather
    them; saving and loading prefixes read and write whole tensors (``modifier_rank``: the rank whose
    writes are kept)."""
    if not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield
