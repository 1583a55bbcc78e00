"""Generation on a held-out split (captions, or VQA answers), sharded over ranks.

Records may be an in-memory list or a lazy dataset; items a dataset skipped (bad images, in skip mode)
are dropped. Under ZeRO-3 every rank must make the same number of ``generate`` calls, so shards are
padded to equal length and a batch left empty by skipping still runs (on a stand-in record whose output is
discarded).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ptscale.config import EvalConfig
from ptscale.console import progress
from ptscale.data.collate import CaptionCollator


def shard(indices: list[int], rank: int, world: int) -> list[int]:
    """Every rank gets the same number of items; the padding repeats items, and duplicates are dropped
    after gathering."""
    per_rank = math.ceil(len(indices) / world)
    padded = indices + indices[: per_rank * world - len(indices)]
    return padded[rank * per_rank:(rank + 1) * per_rank]


def record_key(record: dict) -> str:
    return str(record["question_id"]) if "question_id" in record else str(record["image_id"])


@torch.no_grad()
def generate_captions(model, collator: CaptionCollator, records: Sequence[dict], cfg: EvalConfig, *,
                      rank: int = 0, world: int = 1, synced: bool = False) -> dict[str, str]:
    """key (image_id, or question_id for VQA) -> generated text, for this rank's shard."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    mine = shard(list(range(len(records))), rank, world)
    out: dict[str, str] = {}
    stand_in = None
    # rank 0's shard stands for all (every rank has as many batches); the bar goes when done (leave=False):
    # the evaluation's result line follows
    bar = progress(total=len(mine), desc="evaluating", unit="img", leave=False, rank=rank)
    for i in range(0, len(mine), cfg.batch_size):
        chunk = [r for r in (records[j] for j in mine[i:i + cfg.batch_size]) if r]  # skipped items are falsy
        discard = not chunk
        if discard:
            if stand_in is None:
                stand_in = next(r for r in (records[j] for j in range(len(records))) if r)
            chunk = [stand_in]
        stand_in = stand_in or chunk[0]
        batch = {k: v.to(device) for k, v in collator.generation_batch(chunk).items()}
        ids = model.generate(**batch, num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens,
                             min_new_tokens=cfg.min_new_tokens, do_sample=False, synced_gpus=synced)
        bar.update(len(mine[i:i + cfg.batch_size]))
        if discard:
            continue
        new_tokens = collator.generated(ids, batch)  # generate returns the prompt too
        texts = collator.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        for record, text in zip(chunk, texts, strict=True):
            out[record_key(record)] = text.strip()
    bar.close()
    model.train(was_training)
    return out
