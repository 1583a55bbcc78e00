"""Evaluation of a language model on held-out text: loss and perplexity (teacher-forced, over the completion
tokens: the tokens the training loss covers), and for prompt / completion data exact match of the model's own
``generate()`` output against the completion.

Sharded over ranks like caption generation (``ptscale.eval.generate.shard``): every rank makes the same forward
and ``generate`` calls, which ZeRO-3 needs (each call gathers the partitioned parameters collectively).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ptscale.config import EvalConfig
from ptscale.console import progress
from ptscale.data.text_collate import IGNORE, TextCollator
from ptscale.eval.generate import shard

TEXT_METRICS = ("loss", "perplexity", "exact_match")


def normalize(text: str) -> str:
    """Exact match ignores case and runs of whitespace (and the EOS the decode drops)."""
    return re.sub(r"\s+", " ", text).strip().lower()


def row_nll(logits: torch.Tensor, labels: torch.Tensor, *, shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed negative log-likelihood, counted tokens) per row; a causal LM predicts token t+1 at t (shift)."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    nll = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    return nll.sum(dim=1), (labels != IGNORE).sum(dim=1)


@torch.no_grad()
def predict_text(model, collator: TextCollator, records: Sequence[dict], cfg: EvalConfig, *, rank: int = 0,
                 world: int = 1, synced: bool = False) -> dict[str, dict]:
    """record id -> {"nll", "tokens"} (and "generated" for prompt / completion records), for this rank's shard."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    mine = shard(list(range(len(records))), rank, world)
    out: dict[str, dict] = {}
    bar = progress(total=len(mine), desc="evaluating", unit="rec", leave=False, rank=rank)
    for i in range(0, len(mine), cfg.batch_size):
        chunk = [records[j] for j in mine[i:i + cfg.batch_size]]
        batch = {k: v.to(device) for k, v in collator.train_batch(chunk).items()}
        logits = model(**batch).logits
        nll, tokens = row_nll(logits, batch["labels"], shift=not collator.seq2seq)
        rows = [{"nll": float(n), "tokens": int(t)} for n, t in zip(nll, tokens, strict=True)]
        if all("completion" in r for r in chunk):
            for row, text in zip(rows, _generate(model, collator, chunk, cfg, device, synced), strict=True):
                row["generated"] = text
        for record, row in zip(chunk, rows, strict=True):
            out[record["id"]] = row
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    return out


def _generate(model, collator: TextCollator, chunk: list[dict], cfg: EvalConfig, device, synced: bool) -> list[str]:
    batch = {k: v.to(device) for k, v in collator.generation_batch(chunk).items()}
    pad = collator.pad_token_id
    ids = model.generate(**batch, num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens,
                         min_new_tokens=cfg.min_new_tokens, do_sample=False, synced_gpus=synced, pad_token_id=pad)
    new = ids if collator.seq2seq else ids[:, batch["input_ids"].shape[1]:]  # a decoder-only LM repeats the prompt
    return [t.strip() for t in collator.tokenizer.batch_decode(new, skip_special_tokens=True)]


def score_text(preds: dict[str, dict], records: Sequence[dict]) -> tuple[dict[str, float], list[dict]]:
    """Metrics over the split (loss = mean NLL per completion token, perplexity = exp(loss), exact_match in
    [0, 1]) and one row per record, in data order."""
    rows, nll, tokens, matches = [], 0.0, 0, []
    for r in records:
        p = preds[r["id"]]
        nll, tokens = nll + p["nll"], tokens + p["tokens"]
        row = {"id": r["id"], "nll": p["nll"], "tokens": p["tokens"]}
        if "generated" in p:
            row.update(prompt=r["prompt"], reference=r["completion"], generated=p["generated"],
                       exact_match=float(normalize(p["generated"]) == normalize(r["completion"])))
            matches.append(row["exact_match"])
        rows.append(row)
    loss = nll / max(tokens, 1)
    metrics = {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}  # exp overflows past ~709
    if matches:
        metrics["exact_match"] = sum(matches) / len(matches)
    return metrics, rows
