"""The synthetic text tasks of the text embedded default (``data.name: synthetic-text``).

A record applies an operation to a short list of items: prompt ``"reverse c a f ->"``, completion ``"f a c"``.

- ``pretrain``: the broad distribution the default language model is pre-trained on (plain text, loss on every
  token): copy, reverse, first, last, sort, drop-first, in equal shares.
- ``downstream``: the adaptation task, an operation pre-training never shows (``rotate``: the first item moves
  to the end), prompt / completion with the loss on the completion; scored by exact match.

Deterministic in (task, size, seed, split); the splits draw from separate random streams.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable

ITEMS = tuple("abcdefghijklmnop")
ARROW = "->"
MIN_ITEMS, MAX_ITEMS = 3, 6

PRETRAIN_OPS: dict[str, Callable[[list[str]], list[str]]] = {
    "copy": lambda xs: list(xs),
    "reverse": lambda xs: xs[::-1],
    "first": lambda xs: xs[:1],
    "last": lambda xs: xs[-1:],
    "sort": sorted,
    "drop": lambda xs: xs[1:],
}
DOWNSTREAM_OPS: dict[str, Callable[[list[str]], list[str]]] = {"rotate": lambda xs: xs[1:] + xs[:1]}
TEXT_TASKS = ("pretrain", "downstream")


def vocabulary() -> list[str]:
    return [*PRETRAIN_OPS, *DOWNSTREAM_OPS, *ITEMS, ARROW]


def _rng(task: str, seed: int, split: str) -> random.Random:
    key = hashlib.sha256(f"{task}/{seed}/{split}".encode()).digest()
    return random.Random(int.from_bytes(key[:8], "little"))


def make_text_split(task: str, size: int, seed: int, split: str) -> list[dict]:
    """``size`` records: ``{"id", "prompt", "completion"}`` (downstream) or ``{"id", "text"}`` (pretrain)."""
    if task not in TEXT_TASKS:
        raise ValueError(f"synthetic-text task {task!r}; known: {', '.join(TEXT_TASKS)}")
    ops = PRETRAIN_OPS if task == "pretrain" else DOWNSTREAM_OPS
    rng = _rng(task, seed, split)
    records = []
    for i in range(size):
        name = rng.choice(sorted(ops))
        items = rng.sample(ITEMS, rng.randint(MIN_ITEMS, MAX_ITEMS))
        prompt = " ".join([name, *items, ARROW])
        completion = " ".join(ops[name](items))
        record = {"id": str(i), "prompt": prompt, "completion": completion}
        records.append({"id": str(i), "text": f"{prompt} {completion}"} if task == "pretrain" else record)
    return records
