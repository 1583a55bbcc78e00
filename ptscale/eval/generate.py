"""Caption generation on a held-out split, sharded over ranks, scored on rank 0."""

from __future__ import annotations

import math

import torch

from ptscale.config import EvalConfig
from ptscale.data.collate import CaptionCollator


def shard(records: list[dict], rank: int, world: int) -> list[dict]:
    """Every rank gets the same number of records (ZeRO-3 generation runs in lockstep); the padding
    repeats records, and duplicates are dropped after gathering."""
    per_rank = math.ceil(len(records) / world)
    padded = records + records[: per_rank * world - len(records)]
    return padded[rank * per_rank:(rank + 1) * per_rank]


@torch.no_grad()
def generate_captions(model, collator: CaptionCollator, records: list[dict], cfg: EvalConfig, *,
                      rank: int = 0, world: int = 1, synced: bool = False) -> dict[str, str]:
    """image_id -> generated caption for this rank's shard. ``model`` has ``generate`` (PrefixTunedModel)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    mine = shard(records, rank, world)
    out: dict[str, str] = {}
    for i in range(0, len(mine), cfg.batch_size):
        chunk = mine[i:i + cfg.batch_size]
        batch = {k: v.to(device) for k, v in collator.generation_batch(chunk).items()}
        ids = model.generate(**batch, num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens,
                             min_new_tokens=cfg.min_new_tokens, do_sample=False, synced_gpus=synced)
        new_tokens = ids[:, batch["input_ids"].shape[1]:]  # generate returns the prompt too
        texts = collator.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        for record, text in zip(chunk, texts, strict=True):
            out[record["image_id"]] = text.strip()
    model.train(was_training)
    return out
