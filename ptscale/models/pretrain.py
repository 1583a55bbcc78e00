"""Pre-training of the embedded default backbone on the broad synthetic distribution.

All parameters train (plain PyTorch, one process): this stands in for the large-scale pre-training a
real BLIP-2 checkpoint comes with, so that PT-PEFT has a pre-trained model to adapt.
"""

from __future__ import annotations

import logging
import math
import random

import torch
from transformers import Blip2ForConditionalGeneration
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from ptscale.console import progress
from ptscale.data.collate import CaptionCollator
from ptscale.data.synthetic import IMAGE_SIZE, pretraining_mixture, vocabulary
from ptscale.models.presets import blip2_config
from ptscale.models.tokenizer import word_tokenizer

log = logging.getLogger(__name__)

SEED = 20240601
BATCH = 32
LR = 2e-3
SIZE = 8192  # broad captions and questions, half each (ptscale.data.synthetic.pretraining_mixture)
MAX_TEXT_LEN = 40  # the longest pre-training caption (three objects) is 26 words


def tiny_processor() -> BlipImageProcessorPil:
    return BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def new_tiny_model(preset: str, seed: int = SEED):
    tokenizer = word_tokenizer(vocabulary())
    torch.manual_seed(seed)
    cfg = blip2_config(preset, vocab_size=len(tokenizer), pad=tokenizer.pad_token_id,
                       bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id,
                       image_token=tokenizer.convert_tokens_to_ids("<image>"))
    return Blip2ForConditionalGeneration(cfg), tokenizer


def pretrain_default(preset: str, steps: int):
    """(model, tokenizer, image processor) pre-trained ``steps`` steps; a language-model preset has no image
    processor (None)."""
    from ptscale.models.presets import TEXT_PRESETS

    if preset in TEXT_PRESETS:
        from ptscale.models.pretrain_text import pretrain_text

        model, tokenizer = pretrain_text(preset, steps)
        return model, tokenizer, None
    model, tokenizer = new_tiny_model(preset)
    processor = tiny_processor()
    collate = CaptionCollator(processor, tokenizer, model.config.num_query_tokens, model.config.image_token_id,
                              max_text_len=MAX_TEXT_LEN)
    records = collate.preprocess(pretraining_mixture(SIZE, SEED))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.99), weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = random.Random(SEED)
    model.train()
    bar = progress(total=steps, desc="pre-training backbone")
    for step in range(steps):
        idx = rng.sample(range(len(records)), BATCH)
        batch = collate.train_batch([records[i] for i in idx])
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.update(1)
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if step % 500 == 0 or step == steps - 1:  # for logs without a terminal (the bar is not in them)
            log.debug("pre-training step %d/%d loss %.4f", step + 1, steps, loss.item())
    bar.close()
    model.eval()
    return model, tokenizer, processor
