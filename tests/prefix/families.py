"""Tiny random models of every supported family, their batches, and an explicit float64 reference
attention (written out with loops, independent of ptscale.prefix.attention) to register in place of
the hook."""

from __future__ import annotations

import torch
from transformers import (
    AttentionInterface,
    Blip2Config,
    Blip2ForConditionalGeneration,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ptscale.config import PrefixConfig
from ptscale.prefix.attention import SLOT_ATTR
from ptscale.prefix.model import PrefixTunedModel
from ptscale.prefix.plus import PlusLayer

VOCAB = 40
IMAGE_TOKEN = VOCAB - 1
NUM_QUERY = 3
REFERENCE = "ptscale_test_explicit"

_T5 = dict(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=4,
           relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
           decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, feed_forward_proj="gated-gelu")
_OPT = dict(model_type="opt", vocab_size=VOCAB, hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, word_embed_proj_dim=16, dropout=0.0, attention_dropout=0.0,
            pad_token_id=0, bos_token_id=2, eos_token_id=1)
_DECODER = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=1)


def _blip2(text_config: dict) -> Blip2ForConditionalGeneration:
    cfg = Blip2Config(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=8, attention_dropout=0.0),
        qformer_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                            encoder_hidden_size=16, vocab_size=VOCAB, max_position_embeddings=32,
                            attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0),
        text_config=text_config, num_query_tokens=NUM_QUERY, image_token_index=IMAGE_TOKEN)
    return Blip2ForConditionalGeneration(cfg)


BUILDERS = {
    "opt": lambda: OPTForCausalLM(OPTConfig(**{k: v for k, v in _OPT.items() if k != "model_type"})),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**_DECODER)),  # grouped-query: 4 query heads, 2 KV heads
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**_DECODER)),
    "t5": lambda: T5ForConditionalGeneration(T5Config(**_T5)),
    "blip2-opt": lambda: _blip2(_OPT),
    "blip2-t5": lambda: _blip2(dict(model_type="t5", **_T5)),
}
FAMILIES = tuple(BUILDERS)
DECODER_ONLY = ("opt", "llama", "qwen2")
ENCODER_DECODER = ("t5", "blip2-t5")

# Prefix lengths per family: every target a family has, with different lengths.
LENGTHS = {
    "opt": {"language_model": 3},
    "llama": {"language_model": 3},
    "qwen2": {"language_model": 3},
    "t5": {"encoder": 3, "decoder": 2},
    "blip2-opt": {"vision": 2, "qformer": 2, "language_model": 3},
    "blip2-t5": {"qformer": 2, "encoder": 3, "decoder": 2},
}


def build(family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    return BUILDERS[family]().to(dtype).eval()


def prefixed(base, lengths: dict, *, kind: str = "classic", dtype: torch.dtype = torch.float64,
             **cfg) -> PrefixTunedModel:
    """``base`` with prefixes of ``lengths`` (a small encoder, large init so they matter), every weight trainable:
    the tests compare gradients of every parameter, the base's included. Prefix-Tuning+'s fresh gate is 0 (no
    effect), so every head gets a different nonzero gate."""
    model = PrefixTunedModel(base, PrefixConfig(lengths=lengths, kind=kind, encoder_hidden=8, init_std=0.5, **cfg),
                             freeze_base=False).to(dtype)
    if kind == "plus":
        torch.manual_seed(5)
        with torch.no_grad():
            for module in model.prefixes.values():
                module.gate.uniform_(0.5, 1.5)
    return model


def make_batch(family: str, dtype: torch.dtype = torch.float32, seed: int = 1) -> dict:
    """A padded batch of 2 with labels: left padding for decoder-only LMs, right padding elsewhere."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, IMAGE_TOKEN, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    if family in DECODER_ONLY:
        mask[1, :2] = 0
        ids[1, :2] = 0
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    mask[1, -2:] = 0
    ids[1, -2:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if family.startswith("blip2"):
        batch["input_ids"] = torch.cat([torch.full((2, NUM_QUERY), IMAGE_TOKEN), ids], dim=1)
        batch["attention_mask"] = torch.cat([torch.ones(2, NUM_QUERY, dtype=mask.dtype), mask], dim=1)
        batch["pixel_values"] = torch.randn(2, 3, 16, 16, generator=g, dtype=dtype)
        if family == "blip2-opt":
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            batch["labels"] = labels.masked_fill(batch["input_ids"] == IMAGE_TOKEN, -100)
            return batch
    dec = torch.randint(3, IMAGE_TOKEN, (2, 5), generator=g)
    dec_mask = torch.ones_like(dec)
    dec_mask[1, -1] = 0
    batch.update(decoder_input_ids=dec, decoder_attention_mask=dec_mask,
                 labels=dec.masked_fill(dec_mask == 0, -100))
    return batch


def real_positions(family: str, batch: dict) -> torch.Tensor:
    """(B, L) bool: the logits positions that are real tokens."""
    if family in ENCODER_DECODER:
        return batch["decoder_attention_mask"].bool()
    return batch["attention_mask"].bool()


# --- the explicit reference ----------------------------------------------------------------------------
def _elu1(x):
    return torch.where(x > 0, x + 1.0, torch.exp(x))


def explicit_plus(q, keys, values, gate, feature_map, scale):
    """Prefix-Tuning+ memory term, written per head as an attention-like weighted sum over the P memory
    slots: w_ij = phi(s q_i) . phi(k_j); m_i = sum_j w_ij v_j / (sum_j w_ij + 1e-6); identity:
    m_i = sum_j ((s q_i) . k_j) v_j / P. Returns gate_h * m_i, (B, Hq, L, D)."""
    hq, hkv, p = q.shape[1], keys.shape[0], keys.shape[1]
    out = torch.zeros_like(q)
    for h in range(hq):
        k, v = keys[h // (hq // hkv)], values[h // (hq // hkv)]
        qs = q[:, h] * scale  # (B, L, D)
        if feature_map == "identity":
            term = (qs @ k.T) @ v / p
        else:
            phi = _elu1 if feature_map == "elu1" else torch.relu
            w = phi(qs) @ phi(k).T  # (B, L, P)
            term = (w @ v) / (w.sum(-1, keepdim=True) + 1e-6)
        out[:, h] = gate[h] * term
    return out


def explicit_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_bias=None,
                       **kwargs):
    """softmax over [prefix; sequence] written out (classic), or softmax over the sequence plus the explicit
    memory term (plus). GQA by repeating K/V heads; T5's position bias on sequence keys only; causality
    bottom-right aligned; padding recovered from the model's own boolean mask."""
    b, hq, lq, d = query.shape
    lk = key.shape[2]
    groups = hq // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scaling = d ** -0.5 if scaling is None else scaling
    slot = getattr(module, SLOT_ATTR, None)
    state = slot.get() if slot is not None else None
    plus = state if isinstance(state, PlusLayer) else None
    if state is None or plus is not None:
        pk = pv = query.new_zeros(hq, 0, d)
    else:
        pk, pv = (x.repeat_interleave(groups, 0) for x in state)
    p = pk.shape[1]
    causal = getattr(module, "is_causal", False)
    keep = torch.ones(b, lq, p + lk, dtype=torch.bool)
    for i in range(lq):
        for j in range(lk):
            if causal and j > i + (lk - lq):
                keep[:, i, p + j] = False
    if attention_mask is not None:
        pad = attention_mask[:, 0, -1, :] if causal else attention_mask[:, 0, 0, :]
        keep[:, :, p:] &= pad.expand(b, lk)[:, None, :]
    keys = torch.cat([pk.expand(b, -1, -1, -1), key], dim=2)
    vals = torch.cat([pv.expand(b, -1, -1, -1), value], dim=2)
    scores = query @ keys.transpose(-1, -2) * scaling
    if position_bias is not None:
        scores = scores + torch.cat([scores.new_zeros(*position_bias.shape[:3], p), position_bias], dim=-1)
    scores = scores.masked_fill(~keep[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked (padding) rows: 0
    out = probs @ vals
    if plus is not None:
        out = out + explicit_plus(query, plus.keys, plus.values, plus.gate, plus.feature_map, scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(REFERENCE, explicit_attention)
AttentionMaskInterface.register(REFERENCE, sdpa_mask)
