"""Tiny standalone language-model checkpoints (OPT, Llama with grouped-query attention) saved the way a user's
are (``save_pretrained``: weights, config and tokenizer), and JSONL text data for them."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from ptscale.models.tokenizer import word_tokenizer

WORDS = [f"w{i}" for i in range(16)] + ["reverse", "copy", "->"]
_COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
               pad_token_id=1, bos_token_id=2, eos_token_id=2)


def save_lm(family: str, path: Path, seed: int = 0) -> Path:
    """A random tiny ``family`` model and its word tokenizer in ``path``."""
    tok = word_tokenizer(WORDS)
    torch.manual_seed(seed)
    if family == "opt":
        model = OPTForCausalLM(OPTConfig(vocab_size=len(tok), ffn_dim=64, word_embed_proj_dim=32, dropout=0.0,
                                         attention_dropout=0.0, **_COMMON))
    elif family == "llama":  # grouped-query attention: 4 query heads share 2 KV heads; RoPE positions
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), intermediate_size=64, num_key_value_heads=2,
                                             **_COMMON))
    elif family == "t5":
        model = T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                    num_heads=4, dropout_rate=0.0, pad_token_id=1, eos_token_id=2,
                                                    decoder_start_token_id=1))
    else:
        raise ValueError(family)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def reverse_records(n: int, seed: int) -> list[dict]:
    """prompt "reverse w3 w7 w1 ->", completion "w1 w7 w3": a short-answer task."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.sample(WORDS[:16], 3)
        out.append({"prompt": "reverse " + " ".join(words) + " ->", "completion": " ".join(reversed(words))})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
