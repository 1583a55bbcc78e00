"""Prefix-Tuning+ (Wang et al., 2025, arXiv 2506.13674; later titled PrefixMemory-Tuning): the prefix
moved out of the attention softmax.

Classic prefix-tuning puts P trainable keys/values inside each head's softmax, so the prefix competes
with the sequence for attention mass: the longer the input, the less the prefix can say. Prefix-Tuning+
keeps the model's own attention over the sequence untouched and adds the prefix as a separate,
linear-attention memory. The paper's exact feature map and normalisation were not available here;
this module fixes the following choices (and makes the feature map a switch, ``prefix.feature_map``).

Per layer, query head h (KV head g(h) = h // (query heads / KV heads), as in grouped-query attention)
and query i, with the layer's own softmax scale s (q is scaled once, as the model itself does)::

    o_i = SoftmaxAttn(q_i, K_seq, V_seq) + gate_h * m_i
    elu1 / relu:  phi = elu(x) + 1  or  relu(x)
        M = sum_j phi(k_j) v_j^T   (D x D)      z = sum_j phi(k_j)   (D)
        m_i = phi(s q_i)^T M / (phi(s q_i)^T z + eps)      eps = 1e-6
    identity (softmax-free, no normalisation):
        m_i = (s q_i)^T (sum_j k_j v_j^T) / P

* The memory M is built from P trainable key/value vectors per layer and KV head, i.e. the same
  (layers, 2, heads, P, head_dim) tensor a classic prefix has: the same encoders (mlp / linear / none),
  folding, saving and stage plans apply unchanged. rank(M) <= P.
* elu1 keeps every feature positive, so the normaliser is > 0 and m_i is a convex combination of the
  memory values (a softmax-free "attention" over the prefix that is not diluted by sequence length).
  relu can zero the normaliser; the numerator is then zero too, and m_i = 0. identity has no positive
  normaliser, so the term is averaged over the P positions instead.
* ``gate`` (layers, query heads) starts at 0, so a fresh plus-prefix leaves the base model exactly
  unchanged (the zero-init gating of LLaMA-Adapter). The first step then only moves the gate: the
  gradient reaching the memory is proportional to the gate.
* The memory term sees no mask: like a classic prefix, every query (padding included; padded rows are
  never read) sees the whole memory, and causality concerns the sequence only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ptscale.prefix.encoder import FoldedPrefix, PrefixEncoder

FEATURE_MAPS = ("elu1", "relu", "identity")
EPS = 1e-6


def feature_map(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "elu1":
        return F.elu(x) + 1.0
    if name == "relu":
        return F.relu(x)
    if name == "identity":
        return x
    raise ValueError(f"prefix.feature_map: unknown {name!r}; use one of {', '.join(FEATURE_MAPS)}")


@dataclass
class PlusState:
    """One target's Prefix-Tuning+ memory for the current forward pass."""

    kv: torch.Tensor  # (layers, 2, KV heads, P, head_dim)
    gate: torch.Tensor  # (layers, query heads)
    feature_map: str

    def layer(self, i: int) -> PlusLayer:
        return PlusLayer(self.kv[i, 0], self.kv[i, 1], self.gate[i], self.feature_map)


@dataclass
class PlusLayer:
    keys: torch.Tensor  # (KV heads, P, D)
    values: torch.Tensor  # (KV heads, P, D)
    gate: torch.Tensor  # (query heads,)
    feature_map: str


def memory_term(query: torch.Tensor, mem: PlusLayer, scaling: float) -> torch.Tensor:
    """gate_h * m_i for every query: query (B, Hq, L, D) -> (B, Hq, L, D). See the module docstring."""
    hq, hkv = query.shape[1], mem.keys.shape[0]
    if hq % hkv:
        raise ValueError(f"Prefix-Tuning+: {hq} query heads are not a multiple of {hkv} memory (KV) heads")
    # At least fp32: under bf16/fp16 the normaliser would otherwise be a sum of P rounded products.
    work = torch.promote_types(query.dtype, torch.float32)
    keys = mem.keys.to(work).repeat_interleave(hq // hkv, 0)  # (Hq, P, D)
    values = mem.values.to(work).repeat_interleave(hq // hkv, 0)
    q = query.to(work) * scaling
    if mem.feature_map == "identity":
        memory = keys.transpose(-1, -2) @ values / keys.shape[-2]  # (Hq, D, D)
        out = q @ memory
    else:
        fk = feature_map(mem.feature_map, keys)
        memory = fk.transpose(-1, -2) @ values  # (Hq, D, D): sum_j phi(k_j) v_j^T
        norm = fk.sum(dim=-2)  # (Hq, D): sum_j phi(k_j)
        fq = feature_map(mem.feature_map, q)  # (B, Hq, L, D)
        out = (fq @ memory) / ((fq * norm[:, None, :]).sum(-1, keepdim=True) + EPS)
    return (mem.gate.to(work).view(1, hq, 1, 1) * out).to(query.dtype)


class PlusPrefix(nn.Module):
    """A target's Prefix-Tuning+ parameters: ``source`` (a :class:`PrefixEncoder`, or a
    :class:`FoldedPrefix` after folding) gives the memory keys/values; ``gate`` (layers, query heads)."""

    def __init__(self, source: PrefixEncoder | FoldedPrefix, query_heads: int, feature: str) -> None:
        super().__init__()
        if feature not in FEATURE_MAPS:
            raise ValueError(f"prefix.feature_map: unknown {feature!r}; use one of {', '.join(FEATURE_MAPS)}")
        if query_heads % source.shape.num_heads:
            raise ValueError(f"Prefix-Tuning+: {query_heads} query heads are not a multiple of "
                             f"{source.shape.num_heads} KV heads")
        self.source = source
        self.feature_map = feature
        self.gate = nn.Parameter(torch.zeros(source.shape.num_layers, query_heads))

    @property
    def shape(self):
        return self.source.shape

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        # A tuple of tensors (not a PlusState): ZeRO-3's backward hooks only see tensors and tuples.
        return self.source(), self.gate.clone()
