"""Pre-training of the embedded default backbone on the broad synthetic distribution.

All parameters train (plain PyTorch, one process): this stands in for the large-scale pre-training a
real BLIP-2 checkpoint comes with, so that PT-PEFT has a pre-trained model to adapt.
"""

from __future__ import annotations

import logging

import torch
from transformers import Blip2ForConditionalGeneration
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from ptscale.data.collate import CaptionCollator
from ptscale.data.synthetic import IMAGE_SIZE, pretraining_mixture, vocabulary
from ptscale.models.presets import blip2_config
from ptscale.models.pretrain_loop import pretrain_steps
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

    def next_batch(rng):
        return collate.train_batch([records[i] for i in rng.sample(range(len(records)), BATCH)])

    pretrain_steps(model, next_batch, steps, LR, SEED, "pre-training backbone")
    return model, tokenizer, processor
