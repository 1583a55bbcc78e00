"""The prefix encoder of PT-PEFT (paper appendix B.1, figure 6) and its folded form.

Prefix embeddings plus a prefix type embedding (the counterpart of token type embeddings) go through
an MLP re-parameterisation (Li & Liang, 2021) that emits every layer's prefix keys and values. Only
the encoder's output matters at inference, so it can be folded into static keys/values
(:class:`FoldedPrefix`, "the output of the prefix encoder can be saved as the new prefix", B.1).

Table-10 ablations, one switch each: ``type_embedding=False`` (w/o prefix type embedding),
``encoder="linear"`` (w/o MLP: one linear projection), ``encoder="none"`` (w/o encoder: raw K/V).

Every module here returns a fresh tensor from ``forward``: under ZeRO-3 a parameter's storage is
released when its module's forward ends, and the attention layers read the prefix later.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

ENCODERS = ("mlp", "linear", "none")


@dataclass(frozen=True)
class PrefixShape:
    num_layers: int
    num_heads: int  # key/value heads (grouped-query attention: fewer than the query heads)
    head_dim: int
    length: int

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.num_heads, self.length, self.head_dim)


class PrefixEncoder(nn.Module):
    """Produces prefix keys/values of shape (layers, 2, heads, length, head_dim).

    encoder="mlp": embeddings (+ type embedding) -> Linear -> Tanh -> Linear(-> layers*2*width).
    encoder="linear": embeddings (+ type embedding) -> Linear(-> layers*2*width) (table 10 "w/o MLP").
    encoder="none": raw per-layer key/value parameters (table 10 "w/o encoder"; no type embedding).
    """

    def __init__(self, shape: PrefixShape, *, encoder: str = "mlp", hidden: int = 512,
                 type_embedding: bool = True, init_std: float = 0.02) -> None:
        super().__init__()
        if encoder not in ENCODERS:
            raise ValueError(f"prefix.encoder: unknown kind {encoder!r}; use one of {', '.join(ENCODERS)}")
        self.shape = shape
        self.kind = encoder
        s = shape
        if encoder == "none":
            self.kv = nn.Parameter(torch.randn(*s.kv_shape) * init_std)
            return
        self.embedding = nn.Parameter(torch.randn(s.length, s.width) * init_std)
        self.type_embedding = nn.Parameter(torch.zeros(1, s.width)) if type_embedding else None
        out = s.num_layers * 2 * s.width
        if encoder == "linear":
            # Default (Kaiming-uniform) weight: outputs of std ~ init_std / sqrt(3), the scale of "none".
            self.proj = nn.Linear(s.width, out)
            nn.init.zeros_(self.proj.bias)
            return
        self.mlp = nn.Sequential(nn.Linear(s.width, hidden), nn.Tanh(), nn.Linear(hidden, out))
        # Small output init: a fresh prefix should barely move a pre-trained model's attention.
        nn.init.normal_(self.mlp[2].weight, std=init_std)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self) -> torch.Tensor:
        s = self.shape
        if self.kind == "none":
            return self.kv.clone()
        x = self.embedding  # (P, width)
        if self.type_embedding is not None:
            x = x + self.type_embedding
        out = self.proj(x) if self.kind == "linear" else self.mlp(x)  # (P, layers*2*width)
        return out.view(s.length, s.num_layers, 2, s.num_heads, s.head_dim).permute(1, 2, 3, 0, 4)


class FoldedPrefix(nn.Module):
    """Static prefix keys/values (layers, 2, heads, length, head_dim): a folded encoder's output."""

    def __init__(self, kv: torch.Tensor) -> None:
        super().__init__()
        if kv.dim() != 5 or kv.shape[1] != 2:
            raise ValueError(f"FoldedPrefix: kv must be (layers, 2, heads, length, head_dim), got {tuple(kv.shape)}")
        self.shape = PrefixShape(num_layers=kv.shape[0], num_heads=kv.shape[2], head_dim=kv.shape[4],
                                 length=kv.shape[3])
        self.kv = nn.Parameter(kv.detach().clone())

    def forward(self) -> torch.Tensor:
        return self.kv.clone()
