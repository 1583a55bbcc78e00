"""Tiny random OFA models (ptscale.models.ofa) and their padded batches, shared by tests/models/test_ofa.py and
tests/prefix/test_ofa_prefix.py.

The weights are drawn with init std 0.2 (OFA's own 0.02 gives nearly flat logits at this size), so greedy margins
and the effect of a prefix are far above rounding; dropout is 0 everywhere."""

from __future__ import annotations

import torch

from ptscale.models.ofa import OFAConfig, OFAModel

VOCAB = 60
BOS, PAD, EOS = 0, 1, 2  # OFA's (BART's) special ids
IMAGE = 64  # 64 x 64 pixels -> a 4 x 4 grid of image tokens (the ResNet's stride is 16)


def ofa_config(**kw) -> OFAConfig:
    cfg = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, resnet_layers=[1, 1, 1],
               image_bucket_size=8, token_bucket_size=16, max_position_embeddings=64, init_std=0.2, dropout=0.0,
               attention_dropout=0.0, activation_dropout=0.0, num_codes=4, num_bins=4, image_resolution=IMAGE)
    cfg.update(kw)
    return OFAConfig(**cfg)


def build_ofa(seed: int = 0, dtype: torch.dtype = torch.float64, **kw) -> OFAModel:
    torch.manual_seed(seed)
    return OFAModel(ofa_config(**kw)).to(dtype).eval()


def ofa_batch(dtype: torch.dtype = torch.float64, seed: int = 1, image: int = IMAGE) -> dict:
    """Two samples: a prompt of 7 tokens (the second row right-padded by 3), an image each, and 5 decoder tokens
    from BOS with their labels (no decoder padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 7), generator=g)
    ids[:, 0] = BOS
    mask = torch.ones_like(ids)
    ids[1, -3:], mask[1, -3:] = PAD, 0
    dec = torch.randint(3, VOCAB, (2, 5), generator=g)
    dec[:, 0] = BOS
    labels = torch.cat([dec[:, 1:], torch.full((2, 1), EOS)], dim=1)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(2, 3, image, image, generator=g,
                                                                                  dtype=dtype),
            "decoder_input_ids": dec, "labels": labels}


def prompt(batch: dict) -> dict:
    """What ``generate`` takes: the encoder's inputs."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
