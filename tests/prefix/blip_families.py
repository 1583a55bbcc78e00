"""Tiny random BLIP models (captioning and VQA), their padded batches, and an explicit float64 reference for
the module wrappers' attention (written out, independent of ptscale.prefix.attention)."""

from __future__ import annotations

import torch
from transformers import BlipConfig, BlipForConditionalGeneration, BlipForQuestionAnswering

from tests.prefix.families import explicit_plus

VOCAB = 40
BOS, SEP, PAD = 2, 3, 0
IMAGE = 16

BLIP_FAMILIES = ("blip-caption", "blip-vqa")
# Every target each model has, with different lengths.
BLIP_LENGTHS = {
    "blip-caption": {"vision": 2, "decoder": 3},
    "blip-vqa": {"vision": 2, "encoder": 3, "decoder": 2},
}


def blip_config(layers: int = 2) -> BlipConfig:
    return BlipConfig(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
                           image_size=IMAGE, patch_size=8, attention_dropout=0.0),
        text_config=dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                         num_attention_heads=2, encoder_hidden_size=16, bos_token_id=BOS, sep_token_id=SEP,
                         pad_token_id=PAD, max_position_embeddings=64, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0))


def build_blip(family: str, seed: int = 0, dtype: torch.dtype = torch.float64):
    torch.manual_seed(seed)
    cls = BlipForConditionalGeneration if family == "blip-caption" else BlipForQuestionAnswering
    return cls(blip_config()).to(dtype).eval()


def blip_batch(family: str, dtype: torch.dtype = torch.float64, seed: int = 1) -> dict:
    """A batch of 2 with right padding in the second row (text) and labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (2, 6), generator=g)
    ids[:, 0] = BOS
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    ids[1, -2:] = PAD
    batch = {"pixel_values": torch.randn(2, 3, IMAGE, IMAGE, generator=g, dtype=dtype), "input_ids": ids,
             "attention_mask": mask}
    if family == "blip-caption":
        batch["labels"] = ids.masked_fill(mask == 0, -100)
        return batch
    answer = torch.randint(4, VOCAB, (2, 4), generator=g)
    answer[:, 0] = BOS
    answer_mask = torch.ones_like(answer)
    answer_mask[0, -1] = 0
    answer[0, -1] = PAD
    # decoder_input_ids given: BLIP's VQA model would otherwise feed the labels (with their -100) to the decoder
    batch.update(decoder_input_ids=answer, decoder_attention_mask=answer_mask,
                 labels=answer.masked_fill(answer_mask == 0, -100))
    return batch


def explicit_wrapped_attention(module, query, key, value, prefix, attention_mask, *, scaling, dropout, causal):
    """softmax(q [pk; k]^T * s + [0; mask]) [pv; v], written out, the module's own additive mask added to the
    sequence scores as it is (causality and padding are in it); Prefix-Tuning+: softmax over the sequence plus
    the explicit memory term. Returns (B, L, H, D) like ``ptscale.prefix.wrapper.wrapped_attention``."""
    assert dropout == 0.0
    b, h, lq, d = query.shape
    mask = query.new_zeros(1, 1, lq, key.shape[2]) if attention_mask is None else attention_mask
    if mask.dtype == torch.bool:
        mask = torch.zeros_like(mask, dtype=query.dtype).masked_fill(~mask, torch.finfo(query.dtype).min)
    plus = prefix if not isinstance(prefix, tuple) else None
    pk, pv = (query.new_zeros(h, 0, d),) * 2 if plus is not None else prefix
    p = pk.shape[1]
    out = torch.empty_like(query)
    for i in range(b):
        for head in range(h):
            keys = torch.cat([pk[head], key[i, head]])
            values = torch.cat([pv[head], value[i, head]])
            scores = query[i, head] @ keys.T * scaling
            scores[:, p:] = scores[:, p:] + mask[min(i, mask.shape[0] - 1), 0]
            out[i, head] = torch.softmax(scores, dim=-1) @ values
    if plus is not None:
        out = out + explicit_plus(query, plus.keys, plus.values, plus.gate, plus.feature_map, scaling)
    return out.transpose(1, 2)
