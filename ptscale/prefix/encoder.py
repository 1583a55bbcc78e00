"""The prefix encoder of PT-PEFT (paper appendix B.1, figure 6).

Prefix embeddings plus a prefix type embedding (the counterpart of token type embeddings) go through
an MLP re-parameterisation (Li & Liang, 2021) that emits every layer's prefix keys and values. Only
the encoder's output matters at inference, so it can be folded into static keys/values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class PrefixShape:
    num_layers: int
    num_heads: int
    head_dim: int
    length: int

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim


class PrefixEncoder(nn.Module):
    """Produces prefix keys/values of shape (layers, 2, heads, length, head_dim).

    encoder="mlp": embeddings (+ type embedding) -> Linear -> Tanh -> Linear(-> layers*2*width).
    encoder="none": raw per-layer key/value parameters (the table-10 "w/o encoder" ablation).
    """

    def __init__(self, shape: PrefixShape, *, encoder: str = "mlp", hidden: int = 512,
                 type_embedding: bool = True, init_std: float = 0.02) -> None:
        super().__init__()
        self.shape = shape
        self.kind = encoder
        s = shape
        if encoder == "none":
            self.kv = nn.Parameter(torch.randn(s.num_layers, 2, s.num_heads, s.length, s.head_dim) * init_std)
            return
        if encoder != "mlp":
            raise ValueError(f"prefix.encoder: unknown kind {encoder!r}; use 'mlp' or 'none'")
        self.embedding = nn.Parameter(torch.randn(s.length, s.width) * init_std)
        self.type_embedding = nn.Parameter(torch.zeros(1, s.width)) if type_embedding else None
        self.mlp = nn.Sequential(
            nn.Linear(s.width, hidden), nn.Tanh(), nn.Linear(hidden, s.num_layers * 2 * s.width)
        )
        # Small output init: a fresh prefix should barely move a pre-trained model's attention.
        nn.init.normal_(self.mlp[2].weight, std=init_std)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self) -> torch.Tensor:
        s = self.shape
        if self.kind == "none":
            return self.kv
        x = self.embedding
        if self.type_embedding is not None:
            x = x + self.type_embedding
        out = self.mlp(x)  # (P, layers*2*width)
        return out.view(s.length, s.num_layers, 2, s.num_heads, s.head_dim).permute(1, 2, 3, 0, 4)
