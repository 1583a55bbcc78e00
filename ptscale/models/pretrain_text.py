"""Pre-training of the text embedded default (``tiny-llama-text``) on the broad synthetic text distribution
(``ptscale.data.synthetic_text``, task ``pretrain``): all parameters, plain PyTorch, one process, the loss on
every token. It stands in for the pre-training a real checkpoint comes with, so that the methods adapt a
language model that already knows its vocabulary and the pre-training operations."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ptscale.data.synthetic_text import make_text_split, vocabulary
from ptscale.data.text_collate import TextCollator
from ptscale.models.presets import TEXT_PRESETS
from ptscale.models.pretrain_loop import pretrain_steps
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
    pretrain_steps(model, lambda rng: collate.train_batch(rng.sample(records, BATCH)), steps, LR, SEED,
                   "pre-training text backbone")
    return model.eval(), tokenizer
