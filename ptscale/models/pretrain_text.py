"""Pre-training of the text embedded default (``tiny-llama-text``) on the broad synthetic text distribution
(``ptscale.data.synthetic_text``, task ``pretrain``): all parameters, plain PyTorch, one process, the loss on
every token. It stands in for the pre-training a real checkpoint comes with, so that the methods adapt a
language model that already knows its vocabulary and the pre-training operations."""

from __future__ import annotations

import math
import random

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ptscale.console import progress
from ptscale.data.synthetic_text import make_text_split, vocabulary
from ptscale.data.text_collate import TextCollator
from ptscale.models.presets import TEXT_PRESETS
from ptscale.models.tokenizer import word_tokenizer

SEED = 20240602
BATCH = 64
LR = 3e-3
RECORDS = 8192


def new_text_model(preset: str, seed: int = SEED) -> tuple[LlamaForCausalLM, object]:
    tokenizer = word_tokenizer(vocabulary())
    spec = {k: v for k, v in TEXT_PRESETS[preset].items() if k != "model_type"}
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **spec)
    return LlamaForCausalLM(config), tokenizer


def pretrain_text(preset: str, steps: int) -> tuple[LlamaForCausalLM, object]:
    model, tokenizer = new_text_model(preset)
    collate = TextCollator(tokenizer, max_text_len=64, pad_token_id=tokenizer.pad_token_id)
    records = make_text_split("pretrain", RECORDS, SEED, "pretrain")
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.99), weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = random.Random(SEED)
    model.train()
    bar = progress(total=steps, desc="pre-training text backbone")
    for step in range(steps):
        batch = collate.train_batch(rng.sample(records, BATCH))
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.update(1)
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    bar.close()
    return model.eval(), tokenizer
