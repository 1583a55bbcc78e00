"""PrefixTunedModel: a transformers model plus one prefix encoder per target module.

Each forward (and each ``generate``) first runs the prefix encoders, then the wrapped model; every
prefixed attention layer reads its slice through the attention hook (``ptscale.prefix.attention``).
The Q-Former has no ``past_key_values``, which is why the prefix enters at the attention interface.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
from torch import nn

from ptscale.config import PrefixConfig
from ptscale.prefix.attention import ATTN_IMPLEMENTATION, PrefixSlot, PrefixStore, attach
from ptscale.prefix.encoder import PrefixEncoder, PrefixShape


class PrefixHookError(RuntimeError):
    """A target's attention cannot take the prefix hook."""


def _check_hookable(name: str, module: nn.Module) -> None:
    src = inspect.getsource(type(module).forward)
    if "ALL_ATTENTION_FUNCTIONS" not in src:
        raise PrefixHookError(
            f"{name} ({type(module).__name__}) does not dispatch through transformers' attention interface, "
            "so a prefix cannot be injected there; remove this target from prefix.lengths")


def _qformer_layers(base: nn.Module) -> list[tuple[str, nn.Module]]:
    # Self-attention only: the Q-Former's cross-attention to the image carries no prefix.
    return [(f"qformer.encoder.layer.{i}.attention.attention", layer.attention.attention)
            for i, layer in enumerate(base.qformer.encoder.layer)]


def _decoder_layers(base: nn.Module) -> list[tuple[str, nn.Module]]:
    lm = base.language_model if hasattr(base, "language_model") else base
    found = [(f"language_model.{n}", m) for n, m in lm.named_modules() if n.endswith("self_attn")]
    if not found:
        raise PrefixHookError(f"no self-attention modules (*.self_attn) found in {type(lm).__name__}")
    return found


TARGETS = {"qformer": _qformer_layers, "language_model": _decoder_layers}


def _shape(layers: list[tuple[str, nn.Module]], config, length: int) -> PrefixShape:
    _, first = layers[0]
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(first, "head_dim", None) or getattr(first, "attention_head_size", None)
    return PrefixShape(num_layers=len(layers), num_heads=heads, head_dim=head_dim, length=length)


def _target_config(base: nn.Module, target: str):
    if target == "qformer":
        return base.config.qformer_config
    return base.config.text_config if hasattr(base.config, "text_config") else base.config


class PrefixTunedModel(nn.Module):
    """``base`` plus ``prefixes`` (an encoder per target). Parameter names start with ``base.`` or
    ``prefixes.``, which is what the parameter groups (``ptscale.models.groups``) match on."""

    def __init__(self, base: nn.Module, cfg: PrefixConfig) -> None:
        super().__init__()
        self.base = base
        self.prefixes = nn.ModuleDict()
        self._store = PrefixStore()
        for target, length in cfg.lengths.items():
            if length <= 0:
                continue
            layers = TARGETS[target](base)
            for idx, (name, module) in enumerate(layers):
                _check_hookable(name, module)
                attach(module, PrefixSlot(self._store, target, idx))
            shape = _shape(layers, _target_config(base, target), length)
            self.prefixes[target] = PrefixEncoder(shape, encoder=cfg.encoder, hidden=cfg.encoder_hidden,
                                                  type_embedding=cfg.type_embedding, init_std=cfg.init_std)
        base.set_attn_implementation(ATTN_IMPLEMENTATION)

    @property
    def config(self):
        return self.base.config

    def _activate(self) -> None:
        # Kept until the next call: gradient checkpointing re-reads them during backward.
        self._store.active = {t: enc() for t, enc in self.prefixes.items()}

    def forward(self, **batch):
        self._activate()
        return self.base(**batch)

    @torch.no_grad()
    def generate(self, **kwargs) -> torch.Tensor:
        self._activate()
        with _gathered(list(self.base.parameters(recurse=False))):
            return self.base.generate(**kwargs)

    @contextlib.contextmanager
    def prefixes_disabled(self) -> Iterator[None]:
        """Run the wrapped model as if it had no prefix (analysis, table 5 of the paper)."""
        self._store.enabled = False
        try:
            yield
        finally:
            self._store.enabled = True


@contextlib.contextmanager
def _gathered(params: list[nn.Parameter]) -> Iterator[None]:
    """``generate`` reads top-level parameters (BLIP-2's query_tokens) outside any module forward,
    where ZeRO-3's hooks would not gather them."""
    if not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        yield
