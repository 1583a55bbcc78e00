"""The second prefix mechanism: module wrappers, for attention modules that compute softmax(QK^T)V
themselves instead of dispatching through transformers' attention interface (BLIP's ``BlipAttention``
and ``BlipTextSelfAttention`` in transformers 5.23, ptscale's OFA ``OFAAttention``).

The PEFT way: each target attention module is replaced in its parent by a thin wrapper that

* owns no weights: it adopts the original's submodules (``query``/``key``/``value``, ``qkv``/``projection``,
  ``dropout``) and the weights of its own that its wrapper class names (OFA's per-head scale ``c_attn``) under
  the same names, so parameter names, state dicts, checkpoints, parameter groups and LoRA
  targets are unchanged, and it copies the original's plain attributes (head counts, ``layer_idx``, config);
* with no prefix (length 0 is never wrapped; prefixes disabled; a dormant prefix stage) runs the original
  class's own ``forward`` on itself, so the model computes exactly what it computed before;
* with a prefix computes q, k, v with the original projections (updating the KV cache with the sequence
  keys only: the prefix never enters the cache or its positions) and hands them to the same attention code
  the interface hook uses (``ptscale.prefix.attention``: ``classic_prefix_attention``, or Prefix-Tuning+'s
  ``_plus_forward``), which picks the Triton kernel on CUDA where the mask allows and the torch path
  otherwise.

The module's own mask, whatever it is, still applies to the sequence keys; every query sees every prefix
position. BLIP hands its layers an additive float mask (0 where seen, the dtype's minimum where not). A
mask whose entries are all 0 or at most half the dtype's minimum is exactly a boolean mask (exp of such a
score is 0 in every float dtype) and goes on as one, so the kernel can take it when it is causal + key
padding; any other additive mask is added to the sequence scores as it is (reference / torch path).
The prefix state is read through the same :class:`~ptscale.prefix.attention.PrefixSlot` as the hook, so the
prefix encoder, folding, the removal/noise analysis, Prefix-Tuning+ and gradient checkpointing (the
wrapper re-reads the stored prefix on recomputation) work unchanged.
"""

from __future__ import annotations

import weakref
from typing import ClassVar

import torch
from torch import nn
from transformers.cache_utils import EncoderDecoderCache
from transformers.models.blip.modeling_blip import BlipAttention
from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention

from ptscale.models.ofa import OFAAttention
from ptscale.prefix.attention import SLOT_ATTR, PrefixSlot, _plus_forward, classic_prefix_attention
from ptscale.prefix.plus import PlusLayer

# id(mask) -> (weakref, version, its boolean form or None): transformers builds one mask per forward and hands the
# same tensor to every layer, so the check below (a device sync) runs once per forward, not once per layer, and
# every layer gets the same boolean tensor (whose kernel verdict ``ptscale.prefix.attention`` caches in turn).
_boolean_forms: dict[int, tuple[weakref.ref, int, torch.Tensor | None]] = {}


def _boolean_form(mask: torch.Tensor) -> torch.Tensor | None:
    """``mask == 0`` when an additive float mask holds only 0 (seen) and values <= finfo.min / 2 (not seen), else
    None."""
    entry = _boolean_forms.get(id(mask))
    if entry is not None and entry[0]() is mask and entry[1] == mask._version:
        return entry[2]
    seen = mask == 0
    binary = bool((seen | (mask <= torch.finfo(mask.dtype).min / 2)).all())
    if len(_boolean_forms) > 16:  # drop entries whose mask is gone
        for key in [k for k, v in _boolean_forms.items() if v[0]() is None]:
            del _boolean_forms[key]
    _boolean_forms[id(mask)] = (weakref.ref(mask), mask._version, seen if binary else None)
    return seen if binary else None


def split_mask(mask: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A module's own attention mask as (boolean mask, None) when it is exactly one, else (None, additive bias)."""
    if mask is None or mask.dtype == torch.bool:
        return mask, None
    boolean = _boolean_form(mask)
    return (boolean, None) if boolean is not None else (None, mask)


def wrapped_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      prefix: tuple[torch.Tensor, torch.Tensor] | PlusLayer, attention_mask: torch.Tensor | None, *,
                      scaling: float, dropout: float, causal: bool) -> torch.Tensor:
    """Prefix attention for a wrapped module: q/k/v (B, H, L, D) and the module's own mask in, (B, L, H, D) out.

    ``causal``: the layer is causal; its mask already says so (BLIP builds the causal mask itself), so this
    only lets the kernel take a mask that is checked to be exactly causal + key padding."""
    mask, bias = split_mask(attention_mask)
    causal = causal and mask is not None  # without a mask the module itself applies no causality
    if isinstance(prefix, PlusLayer):
        kwargs = {"is_causal": causal, "position_bias": bias}
        return _plus_forward(module, query, key, value, mask, prefix, scaling, dropout, kwargs)
    pk, pv = prefix
    return classic_prefix_attention(module, query, key, value, pk, pv, mask, causal=causal, scaling=scaling,
                                    dropout=dropout, bias=bias)


class PrefixAttentionWrapper(nn.Module):
    """Base of the wrappers: adopts the original's submodules and attributes; subclasses say how the original
    computes q, k, v and its output (``prefixed_forward``)."""

    wraps: ClassVar[type[nn.Module]]
    # weights of the module itself (not of a submodule) the wrapper registers as its own, under the same names
    adopts: ClassVar[tuple[str, ...]] = ()
    # The module's own forward never reads this (it is False: the wrapper's mask carries causality); SDPA,
    # called on the Prefix-Tuning+ path, would otherwise default to causal for an unmasked layer.
    is_causal = False

    def __init__(self, original: nn.Module, *, causal: bool) -> None:
        super().__init__()
        if type(original) is not self.wraps:
            raise TypeError(f"{type(self).__name__} wraps {self.wraps.__name__}, not {type(original).__name__}")
        own = list(original.named_parameters(recurse=False)) + list(original.named_buffers(recurse=False))
        unknown = [n for n, _ in own if n not in self.adopts]
        if unknown:  # a weight of the module itself the wrapper does not know would be lost
            raise TypeError(f"{type(original).__name__} has weights of its own ({', '.join(unknown)}); "
                            f"the prefix wrapper adopts submodules and {list(self.adopts) or 'no weights'} only")
        for name, p in original.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, value in vars(original).items():
            if not name.startswith("_") and name != "training":
                object.__setattr__(self, name, value)
        for name, child in original.named_children():
            self.add_module(name, child)
        self.train(original.training)
        self.causal = causal

    def extra_repr(self) -> str:
        return f"wraps={self.wraps.__name__}, causal={self.causal}"

    def forward(self, *args, **kwargs):
        slot: PrefixSlot | None = getattr(self, SLOT_ATTR, None)
        prefix = slot.get() if slot is not None else None
        if prefix is None:  # the original computation, on the same submodules
            return self.wraps.forward(self, *args, **kwargs)
        return self.prefixed_forward(prefix, *args, **kwargs)

    def prefixed_forward(self, prefix, *args, **kwargs):
        """The module's attention with ``prefix``'s keys/values: each wrapper class (one per wrapped module type)
        defines it; the base class has no attention of its own to compute."""
        raise NotImplementedError(f"{type(self).__name__} does not define prefixed_forward")

    def _dropout(self) -> float:
        return self.dropout.p if self.training else 0.0


class BlipTextSelfAttentionWrapper(PrefixAttentionWrapper):
    """``BlipTextSelfAttention`` used as self-attention (BLIP's text encoder and decoder; never the
    cross-attention to the image, which is another instance of the same class and gets no prefix)."""

    wraps = BlipTextSelfAttention

    def prefixed_forward(self, prefix, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         encoder_hidden_states: torch.Tensor | None = None,
                         encoder_attention_mask: torch.Tensor | None = None, past_key_values=None, **kwargs):
        if encoder_hidden_states is not None:
            raise RuntimeError("a prefixed BlipTextSelfAttention was called as cross-attention; prefixes belong to "
                               "self-attention only")
        shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
        query = self.query(hidden_states).view(shape).transpose(1, 2)
        key = self.key(hidden_states).view(shape).transpose(1, 2)
        value = self.value(hidden_states).view(shape).transpose(1, 2)
        if past_key_values is not None:  # the sequence keys only: the prefix is added on every call
            cache = (past_key_values.self_attention_cache if isinstance(past_key_values, EncoderDecoderCache)
                     else past_key_values)
            key, value = cache.update(key, value, self.layer_idx)
        out = wrapped_attention(self, query, key, value, prefix, attention_mask,
                                scaling=self.attention_head_size ** -0.5, dropout=self._dropout(), causal=self.causal)
        # (B, L, H, D) -> (B, L, H*D); no attention probabilities (the prefix paths never materialise them)
        return out.reshape(*out.shape[:2], self.all_head_size), None


class BlipAttentionWrapper(PrefixAttentionWrapper):
    """``BlipAttention``: the BLIP vision tower's self-attention (fused qkv projection, no mask)."""

    wraps = BlipAttention

    def prefixed_forward(self, prefix, hidden_states: torch.Tensor, **kwargs):
        b, length, width = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(b, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = wrapped_attention(self, qkv[0], qkv[1], qkv[2], prefix, None, scaling=self.scale,
                                dropout=self._dropout(), causal=False)
        return self.projection(out.reshape(b, length, width)), None


class OFAAttentionWrapper(PrefixAttentionWrapper):
    """``OFAAttention`` used as self-attention (OFA's encoder and decoder; never the decoder's cross-attention).

    OFA adds a position bias to every score besides its mask; both go on as one additive term over the sequence
    keys, so the prefix columns get neither: every query sees every prefix position, with no position bias (a
    prefix has no position). The decoder's cache takes the sequence keys only, so the positions OFA derives from
    its length are the sequence's."""

    wraps = OFAAttention
    adopts = ("c_attn",)
    # the original's own steps, on the adopted submodules: projections through the cache, per-head scale + output
    heads, project, finish = OFAAttention.heads, OFAAttention.project, OFAAttention.finish

    def prefixed_forward(self, prefix, hidden_states: torch.Tensor, key_value_states: torch.Tensor | None = None,
                         attention_mask: torch.Tensor | None = None, attn_bias: torch.Tensor | None = None,
                         past_key_values=None):
        if key_value_states is not None:
            raise RuntimeError("a prefixed OFAAttention was called as cross-attention; prefixes belong to "
                               "self-attention only")
        query, key, value = self.project(hidden_states, None, past_key_values)
        bias = attn_bias
        if attention_mask is not None:
            bias = attention_mask if bias is None else bias + attention_mask
        out = wrapped_attention(self, query, key, value, prefix, bias, scaling=self.scaling,
                                dropout=self._dropout(), causal=self.causal)
        return self.finish(out), None

    def _dropout(self) -> float:
        return self.attn_dropout.p if self.training else 0.0


WRAPPERS: dict[type[nn.Module], type[PrefixAttentionWrapper]] = {
    cls.wraps: cls for cls in (BlipTextSelfAttentionWrapper, BlipAttentionWrapper, OFAAttentionWrapper)}


def wrap(base: nn.Module, name: str, module: nn.Module, *, causal: bool) -> PrefixAttentionWrapper:
    """Replace ``base``'s submodule ``name`` by its wrapper; returns the wrapper (already in place)."""
    wrapper = WRAPPERS[type(module)](module, causal=causal)
    parent, _, child = name.rpartition(".")
    setattr(base.get_submodule(parent) if parent else base, child, wrapper)
    return wrapper
