"""Adapter layers: a bottleneck, and the two wrappers that put it beside or behind a Linear.

Every adapter parameter lives under an attribute named ``ptscale_adapter`` (so its name contains
``.ptscale_adapter.``, which is what the ``adapter`` parameter group matches); the wrapped Linear becomes
``base_layer``, so its parameters keep their component prefix (``base.qformer....dense.base_layer.weight``).
"""

from __future__ import annotations

import torch
from torch import nn

ADAPTER_ATTR = "ptscale_adapter"
ADAPTER_PARAM_PATTERN = r"\.ptscale_adapter\."  # the parameter-group rule (ptscale.models.groups)

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU}


class Bottleneck(nn.Module):
    """down (d_in -> b) -> nonlinearity -> dropout -> up (b -> d_out); the up-projection starts at zero, so a
    fresh adapter adds exactly 0 and the wrapped model's outputs are unchanged until training moves it."""

    def __init__(self, d_in: int, d_out: int, bottleneck: int, *, nonlinearity: str = "relu", dropout: float = 0.0,
                 dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        super().__init__()
        self.down = nn.Linear(d_in, bottleneck, dtype=dtype, device=device)
        self.act = _ACTIVATIONS[nonlinearity]()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, d_out, dtype=dtype, device=device)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        # down keeps nn.Linear's Kaiming-uniform init: with up = 0 its gradient is zero on the first step
        # anyway, and a non-zero down is what lets up's gradient be non-zero.

    @staticmethod
    def num_params(d_in: int, d_out: int, bottleneck: int) -> int:
        return d_in * bottleneck + bottleneck + bottleneck * d_out + d_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(x))))


class SequentialAdapterLinear(nn.Module):
    """Houlsby et al. (2019): ``y = base(x); y + s * A(y)``.

    Placed on the attention output projection and the FFN output Linear, i.e. before the sublayer's dropout,
    residual add and LayerNorm (BERT-style ``dense -> dropout -> LayerNorm(h + input)`` in the Q-Former,
    ``fc2 -> dropout -> residual`` in OPT), which is where Houlsby inserts it. One difference: the model's
    dropout now applies to ``y + A(y)`` instead of before the adapter; BLIP-2's vision encoder has no dropout
    there, and the tiny presets run with 0.
    """

    def __init__(self, base_layer: nn.Linear, adapter: Bottleneck, scale: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        setattr(self, ADAPTER_ATTR, adapter)
        self.scale = scale

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        return y + self.scale * self.ptscale_adapter(y)


class FFNInputTap:
    """Forward pre-hook on an FFN's first Linear: keeps the FFN input until the FFN's output Linear takes it.

    A plain object, not a Module, so it adds no parameters and does not rename the first Linear (LoRA, the
    groups and checkpoints still see ``fc1.weight``). The FFN's two Linears run back to back inside one layer
    forward (also per chunk with ``apply_chunking_to_forward``, and again when gradient checkpointing
    recomputes the layer), so the slot always holds this layer's current input.
    """

    def __init__(self) -> None:
        self._x: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self._x = args[0]

    def take(self) -> torch.Tensor:
        x, self._x = self._x, None  # released at once: no activation outlives its layer's forward
        if x is None:
            raise RuntimeError("parallel adapter: the FFN output Linear ran without its FFN input Linear running first "
                               "in the same layer; the adapter only supports FFNs that call fc1 then fc2")
        return x


class ParallelAdapterLinear(nn.Module):
    """He et al. (2022), the parallel adapter beside the FFN: ``FFN(x) + s * A(x)`` with ``x`` the FFN input.

    Wraps the FFN's output Linear (``fc2``; ``output_query.dense`` in the Q-Former), which computes the FFN's
    output, and reads ``x`` from the :class:`FFNInputTap` on the FFN's first Linear. Wrapping the whole FFN
    would be simpler but is not possible uniformly: OPT's FFN is inline code in the decoder layer and the
    Q-Former's output Linear shares its module with the residual LayerNorm. The sum is formed before the
    model's dropout / residual / LayerNorm, as for the sequential adapter.
    """

    def __init__(self, base_layer: nn.Linear, adapter: Bottleneck, scale: float, tap: FFNInputTap) -> None:
        super().__init__()
        self.base_layer = base_layer
        setattr(self, ADAPTER_ATTR, adapter)
        self.scale = scale
        self.tap = tap

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.tap.take()
        return self.base_layer(h) + self.scale * self.ptscale_adapter(x)


ADAPTER_LAYERS: tuple[type[nn.Module], ...] = (SequentialAdapterLinear, ParallelAdapterLinear)
