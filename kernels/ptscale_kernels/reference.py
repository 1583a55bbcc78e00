"""Plain-torch prefix attention: expand the prefix to the batch, concatenate, mask, SDPA.

This is what HF PEFT's prefix tuning amounts to once its `past_key_values` reach the attention layer
(the "PEFT way"). It is the correctness oracle for the Triton kernels and baseline (a) of the benchmark.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def prefix_attention_mask(
    batch: int,
    seq_len: int,
    prefix_len: int,
    *,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean mask (B, 1, L, P + L) over [prefix keys, sequence keys]; True = may attend.

    Prefix keys are visible to every query; sequence key j is visible to query i when
    (not causal or j <= i) and key_padding_mask[b, j]. The causal part is top-left aligned on the
    sequence (query i sees sequence keys 0..i), which is flash-attn's bottom-right alignment on the
    concatenated keys; SDPA's ``is_causal`` would be wrong here, hence the explicit mask.
    """
    if key_padding_mask is not None:
        device = key_padding_mask.device
    seq = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)
    if causal:
        seq = seq.tril()
    seq = seq.expand(batch, 1, seq_len, seq_len)
    if key_padding_mask is not None:
        seq = seq & key_padding_mask.to(torch.bool)[:, None, None, :]
    prefix = torch.ones(batch, 1, seq_len, prefix_len, dtype=torch.bool, device=seq.device)
    return torch.cat([prefix, seq], dim=-1)


def prefix_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Reference prefix attention with the same contract as `ptscale_kernels.prefix_attention`.

    q, k, v: (B, H, L, D); prefix_k, prefix_v: (H, P, D) with P >= 0 (P = 0 is plain attention);
    key_padding_mask: (B, L) bool, True = real token. Returns (B, H, L, D).

    The prefix is expanded to (B, H, P, D) and concatenated with k / v (memory O(B·H·(P+L)·D)),
    then torch SDPA runs with an explicit boolean mask (see `prefix_attention_mask`). A query row
    with no visible key (only possible with P = 0) gets zeros, as torch SDPA returns for such rows.
    """
    batch, heads, seq_len, head_dim = q.shape
    prefix_len = prefix_k.shape[1]
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    keys = torch.cat([prefix_k.unsqueeze(0).expand(batch, heads, prefix_len, head_dim), k], dim=2)
    values = torch.cat([prefix_v.unsqueeze(0).expand(batch, heads, prefix_len, head_dim), v], dim=2)
    mask = prefix_attention_mask(
        batch, seq_len, prefix_len, key_padding_mask=key_padding_mask, causal=causal, device=q.device
    )
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
