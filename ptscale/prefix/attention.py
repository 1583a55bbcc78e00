"""The attention hook that gives each layer its prefix keys/values.

Registered with transformers' ``AttentionInterface`` (plus the SDPA mask function, so the model still
hands us its boolean masks). Layers without a prefix slot (vision attention, Q-Former
cross-attention) run plain SDPA. With a prefix, every query sees every prefix position, and the
sequence part keeps the model's own mask (causal and/or padding).

Two paths: the reference (concatenate prefix K/V in front, SDPA with an explicit mask) and the Triton
kernel of ``ptscale_kernels``, which reads the (H, P, D) prefix in-kernel. The choice is logged once;
``PTSCALE_ATTENTION=triton`` where the kernel cannot run is an error, never a silent fallback. The
reference path also serves what the kernel does not: grouped-query attention (the prefix lives on the
KV heads and is repeated like them), decoding with a KV cache (q_len != kv_len), attention dropout, masks
that are neither causal nor key padding (checked once per mask tensor, logged once), and
T5's additive relative-position bias (``position_bias``: it covers the sequence keys; prefix keys, which
have no position, get none).

The prefix is added on every call and never enters the KV cache: the cache holds sequence keys only.

Prefix-Tuning+ layers (``ptscale.prefix.plus``) follow the same rule between two paths: the torch path
(the model's own SDPA over the sequence plus ``memory_term``) and ``ptscale_kernels.prefix_plus_attention``,
which adds the gated memory term inside the flash-attention epilogue (the small (H, D, D) memory is built by
torch from the prefix keys/values). The kernel serves neither grouped-query attention nor q_len != kv_len,
nor dropout or a position bias; those keep the torch path.
"""

from __future__ import annotations

import logging
import os
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ptscale.errors import RecipeError
from ptscale.prefix.plus import PlusLayer, PlusState, memory_term

log = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "ptscale_prefix"
BACKENDS = ("auto", "reference", "triton")


@dataclass
class PrefixStore:
    """The prefixes of the current forward pass, per target: classic (layers, 2, H, P, D) keys/values,
    or a Prefix-Tuning+ :class:`PlusState`."""

    active: dict[str, torch.Tensor | PlusState] = field(default_factory=dict)
    enabled: bool = True


@dataclass
class PrefixSlot:
    store: PrefixStore
    target: str
    layer: int

    def get(self) -> tuple[torch.Tensor, torch.Tensor] | PlusLayer | None:
        """This layer's (prefix_k, prefix_v), each (H, P, D); its Prefix-Tuning+ memory; or None."""
        state = self.store.active.get(self.target) if self.store.enabled else None
        if isinstance(state, PlusState):
            return state.layer(self.layer) if state.kv.shape[-2] > 0 else None
        if state is None or state.shape[-2] == 0:
            return None
        return state[self.layer, 0], state[self.layer, 1]


SLOT_ATTR = "_ptscale_prefix"


def attach(module: nn.Module, slot: PrefixSlot) -> None:
    # object.__setattr__: the slot is plain state, not a submodule or parameter of the layer.
    object.__setattr__(module, SLOT_ATTR, slot)


def sequence_mask(module: nn.Module, mask: torch.Tensor | None, q_len: int, kv_len: int,
                  device: torch.device, causal: bool | None = None) -> torch.Tensor | None:
    """The boolean (B|1, 1, q_len, kv_len) mask over sequence keys, or None for "attend all".

    transformers drops the mask when it is purely causal (SDPA's ``is_causal`` then does the work);
    with a prefix in front, SDPA's top-left ``is_causal`` would be wrong, so build it explicitly,
    bottom-right aligned as the KV cache requires.
    """
    if mask is not None:
        if mask.dtype != torch.bool:  # additive float mask
            mask = mask > torch.finfo(mask.dtype).min / 2
        return mask
    if causal is None:
        causal = getattr(module, "is_causal", False)
    if causal and q_len > 1:
        i = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
        return (torch.arange(kv_len, device=device)[None, :] <= i)[None, None]
    return None


def reference_prefix_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                               mask: torch.Tensor | None, scaling: float, dropout: float,
                               bias: torch.Tensor | None = None) -> torch.Tensor:
    """Concatenate the prefix in front of the sequence and run SDPA. Returns (B, H, L, D).

    ``mask``: boolean (B|1, 1, L, kv_len) over the sequence keys or None; ``bias``: an additive
    (B|1, H, L, kv_len) score bias over the sequence keys (T5) or None. Prefix keys: always seen, no bias.
    """
    b = query.shape[0]
    p = prefix_k.shape[-2]
    groups = query.shape[1] // key.shape[1]  # grouped-query attention: prefix lives on the KV heads
    if groups > 1:
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        prefix_k, prefix_v = prefix_k.repeat_interleave(groups, 0), prefix_v.repeat_interleave(groups, 0)
    pk = prefix_k.to(key.dtype).unsqueeze(0).expand(b, -1, -1, -1)
    pv = prefix_v.to(value.dtype).unsqueeze(0).expand(b, -1, -1, -1)
    k = torch.cat([pk, key], dim=2)
    v = torch.cat([pv, value], dim=2)
    if bias is not None:
        bias = bias.to(query.dtype)
        if mask is not None:
            bias = bias.masked_fill(~mask, float("-inf"))
        mask = torch.cat([bias.new_zeros(*bias.shape[:3], p), bias], dim=-1)
    elif mask is not None:
        seen = torch.ones(*mask.shape[:2], mask.shape[2], p, dtype=torch.bool, device=mask.device)
        mask = torch.cat([seen, mask], dim=-1)
    return F.scaled_dot_product_attention(query, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)


_backend_logged: set[str] = set()

# (variant, path) -> number of prefix-attention calls served by it since the last reset: the benchmarks report
# which share of the layers the kernel really served (attention dropout in training, for one, sends a layer
# to the reference path). A host-side dict increment per call; never read by the hook itself.
served: dict[tuple[str, str], int] = {}


def _served(variant: str, path: str) -> None:
    served[(variant, path)] = served.get((variant, path), 0) + 1


def _log_once(key: str, msg: str, level: int = logging.WARNING) -> None:
    if key not in _backend_logged:
        _backend_logged.add(key)
        log.log(level, msg)


@dataclass(frozen=True)
class _Variant:
    what: str  # the layer kind, as the log lines name it
    kernel: str
    fallback: str
    fused: str
    log_prefix: str  # keys of _log_once, so the two variants log their choice separately


_VARIANTS = {
    "classic": _Variant("prefix attention", "the Triton prefix kernel", "reference path (concat + SDPA)",
                        "Triton kernel (prefix K/V read in-kernel)", ""),
    "plus": _Variant("Prefix-Tuning+ attention", "the Triton Prefix-Tuning+ kernel", "torch path (SDPA + memory term)",
                     "Triton kernel (memory term fused)", "plus:"),
}


class BackendError(RecipeError, RuntimeError):
    """PTSCALE_ATTENTION names no backend, or forces a kernel that cannot run here (exit code 2)."""


def backend_setting() -> str:
    wanted = os.environ.get("PTSCALE_ATTENTION", "auto")
    if wanted not in BACKENDS:
        raise BackendError(f"PTSCALE_ATTENTION={wanted!r}: use one of {', '.join(BACKENDS)}")
    return wanted


def _kernel_unavailable(device: torch.device) -> str:
    """Why the Triton kernels cannot run on ``device`` ("" when they can)."""
    try:
        from ptscale_kernels import triton_available
    except ImportError as e:
        return f"ptscale_kernels/triton not importable ({e})"
    # CUDA only: under TRITON_INTERPRET=1 the kernel also runs on CPU, but only its own tests want that.
    if device.type == "cuda" and triton_available(device):
        return ""
    return f"tensors on {device.type} (the Triton kernel runs on CUDA)"


def check_backend_setting(device: torch.device) -> None:
    """Before a run starts (no run directory yet): PTSCALE_ATTENTION names a backend, and a forced kernel can
    run on the run's device, so the setting cannot fail at the first forward."""
    if backend_setting() == "triton" and (why := _kernel_unavailable(device)):
        raise BackendError(f"PTSCALE_ATTENTION=triton but the Triton kernels cannot run: {why}. "
                           "Unset it (auto) or set PTSCALE_ATTENTION=reference.")


def choose_backend(query: torch.Tensor, dropout: float, *, variant: str = "classic") -> str:
    """'triton' or 'reference', from PTSCALE_ATTENTION (auto|reference|triton) and the tensors.

    ``variant``: "classic" (``prefix_attention``) or "plus" (``prefix_plus_attention``); same rule, own log lines.
    """
    names = _VARIANTS[variant]
    wanted = backend_setting()
    if wanted == "reference":
        return "reference"
    why = _kernel_unavailable(query.device)
    available = not why
    if available and query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        available, why = False, f"dtype {query.dtype} (the kernel takes fp16, bf16, fp32)"
    if dropout > 0.0:
        available, why = False, f"attention dropout {dropout} (the kernel has none)"
    if wanted == "triton" and not available:
        raise BackendError(f"PTSCALE_ATTENTION=triton but {names.kernel} cannot run: {why}. "
                           "Unset it (auto) or set PTSCALE_ATTENTION=reference.")
    if not available:
        # On a CPU there is no kernel to fall back from: the reference path is the plan, said once at INFO.
        # On CUDA it is a fallback, said once, loudly.
        level = logging.INFO if query.device.type == "cpu" else logging.WARNING
        _log_once(f"{names.log_prefix}ref:{why}", f"{names.what}: {names.fallback}; kernel unused: {why}", level)
        return "reference"
    _log_once(f"{names.log_prefix}triton", f"{names.what}: {names.fused}", logging.INFO)
    return "triton"


NOT_KEY_PADDING = "a mask that is neither causal nor key padding"


def _key_padding(query: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor | None:
    """(B, L) key padding from a (B|1, 1, L|1, L) sequence mask that is causal and/or padding only.

    The kernels take only a key padding mask (plus their own causal flag), so the mask must be exactly that:
    callers check ``_mask_is_key_padding`` first and send anything else (a block-diagonal or prefix-LM
    mask, per-row holes) to the reference path."""
    if mask is None:
        return None
    # The last query row of a causal mask (bottom-right aligned) sees every unpadded key.
    key_padding = mask[:, 0, -1, :] if causal else mask[:, 0, 0, :]
    return key_padding.expand(query.shape[0], -1)


# id(mask) -> (weakref to it, its version counter, causal, verdict). transformers builds one mask per forward
# and hands the same tensor to every layer, so the comparison below (a device sync) runs once per forward and
# mask, not once per layer.
_mask_verdicts: dict[int, tuple[weakref.ref, int, bool, bool]] = {}


def _mask_is_key_padding(query: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> bool:
    """True when ``mask`` equals the causal (if ``causal``) and key-padding mask that ``_key_padding`` reads
    from it, i.e. when the kernels' (key_padding_mask, causal) describes it exactly."""
    if mask is None:
        return True
    entry = _mask_verdicts.get(id(mask))
    if entry is not None and entry[0]() is mask and entry[1] == mask._version and entry[2] == causal:
        return entry[3]
    key_padding = _key_padding(query, mask, causal)
    q_len, kv_len = query.shape[2], mask.shape[-1]
    want = key_padding[:, None, None, :]
    if causal and q_len > 1:
        i = torch.arange(q_len, device=mask.device)[:, None] + (kv_len - q_len)
        want = want & (torch.arange(kv_len, device=mask.device)[None, :] <= i)
    shape = (query.shape[0], 1, q_len, kv_len)
    verdict = bool(torch.equal(mask.expand(shape), want.expand(shape)))
    if len(_mask_verdicts) > 16:  # drop entries whose mask is gone
        for key in [k for k, v in _mask_verdicts.items() if v[0]() is None]:
            del _mask_verdicts[key]
    _mask_verdicts[id(mask)] = (weakref.ref(mask), mask._version, causal, verdict)
    return verdict


def _kernel_call(module, query, key, value, pk, pv, mask, scaling, *, causal: bool | None = None) -> torch.Tensor:
    from ptscale_kernels import prefix_attention

    causal = bool(getattr(module, "is_causal", False)) if causal is None else causal
    key_padding = _key_padding(query, mask, causal)
    if causal and query.shape[2] != key.shape[2]:
        raise RuntimeError("Triton prefix kernel: causal attention with q_len != kv_len (KV cache) is not "
                           "supported; generation uses the reference path (PTSCALE_ATTENTION=reference)")
    pk, pv = pk.to(query.dtype), pv.to(query.dtype)  # fp32 prefix parameters under a bf16 model
    return prefix_attention(query, key, value, pk, pv, key_padding_mask=key_padding,
                            causal=causal and query.shape[2] > 1, scale=scaling)


def _plus_kernel_call(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, prefix: PlusLayer,
                      mask: torch.Tensor | None, scaling: float, causal: bool) -> torch.Tensor:
    from ptscale_kernels import plus_memory, prefix_plus_attention

    # The (H, D, D) memory and (H, D) normaliser are built by torch (fp32, autograd): tiny and batch-free.
    memory, norm = plus_memory(prefix.keys, prefix.values, prefix.feature_map)
    return prefix_plus_attention(query, key, value, memory, norm, prefix.gate.float(),
                                 feature_map=prefix.feature_map, key_padding_mask=_key_padding(query, mask, causal),
                                 causal=causal and query.shape[2] > 1, scale=scaling)


def _plus_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, prefix: PlusLayer, scaling: float, dropout: float,
                  kwargs: dict) -> torch.Tensor:
    """A Prefix-Tuning+ layer: (B, L, H, D) = SDPA over the sequence + the gated memory term.

    Both prefix mechanisms call it; a module wrapper hands an arbitrary additive mask in as ``position_bias``."""
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", False) if causal is None else bool(causal)
    outside_kernel = ("q_len != kv_len (decoding with a KV cache)" if query.shape[2] != key.shape[2]
                      else "grouped-query attention" if query.shape[1] != key.shape[1]
                      else "an additive position bias or mask" if kwargs.get("position_bias") is not None else None)
    if outside_kernel is None and choose_backend(query, dropout, variant="plus") == "triton":
        mask = sequence_mask(module, attention_mask, query.shape[2], key.shape[2], query.device, causal=causal)
        if _mask_is_key_padding(query, mask, causal):
            _served("plus", "triton")
            return _plus_kernel_call(query, key, value, prefix, mask, scaling, causal).transpose(1, 2).contiguous()
        _log_once(f"plus:outside:{NOT_KEY_PADDING}", f"Prefix-Tuning+ attention: torch path for {NOT_KEY_PADDING} "
                                                    "(the Triton kernel does not cover it)")
    elif outside_kernel is not None and os.environ.get("PTSCALE_ATTENTION") == "triton":
        _log_once(f"plus:outside:{outside_kernel}", f"Prefix-Tuning+ attention: torch path for {outside_kernel} "
                                                   "(the Triton kernel does not cover it)")
    _served("plus", "reference")
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                    dropout=dropout, **kwargs)
    return out + memory_term(query, prefix, scaling).transpose(1, 2)


def classic_prefix_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             prefix_k: torch.Tensor, prefix_v: torch.Tensor, mask: torch.Tensor | None, *,
                             causal: bool, scaling: float, dropout: float,
                             bias: torch.Tensor | None = None) -> torch.Tensor:
    """Classic prefix attention, (B, L, H, D): the one place that picks the Triton kernel or the reference path.

    Both prefix mechanisms call it (the attention-interface hook below and the module wrappers of
    ``ptscale.prefix.wrapper``). ``mask``: the boolean sequence mask as ``sequence_mask`` returns it (causality
    already in it); ``causal``: whether the layer is causal (the kernel's flag; the mask is checked to be
    exactly causal + key padding before the kernel takes it); ``bias``: an additive score bias over the
    sequence keys (T5's position bias, or a module's arbitrary additive mask), which keeps the reference path.
    """
    outside_kernel = ("decoding with a KV cache" if causal and query.shape[2] != key.shape[2]
                      else "grouped-query attention" if query.shape[1] != key.shape[1]
                      else "an additive position bias or mask" if bias is not None else None)
    if outside_kernel is None and choose_backend(query, dropout) == "triton":
        if _mask_is_key_padding(query, mask, causal):
            _served("classic", "triton")
            out = _kernel_call(module, query, key, value, prefix_k, prefix_v, mask, scaling, causal=causal)
            return out.transpose(1, 2).contiguous()
        # The kernel was chosen (auto or forced) but cannot express this mask: say so once, whatever the setting.
        _log_once(f"outside:{NOT_KEY_PADDING}",
                  f"prefix attention: reference path for {NOT_KEY_PADDING} (the Triton kernel does not cover it)")
    elif outside_kernel is not None and os.environ.get("PTSCALE_ATTENTION") == "triton":
        _log_once(f"outside:{outside_kernel}",
                  f"prefix attention: reference path for {outside_kernel} (the Triton kernel does not cover it)")
    _served("classic", "reference")
    out = reference_prefix_attention(query, key, value, prefix_k, prefix_v, mask, scaling, dropout, bias=bias)
    return out.transpose(1, 2).contiguous()


def prefix_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None,
                             dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention interface: q/k/v (B, H, L, D) in, (B, L, H, D) out."""
    slot: PrefixSlot | None = getattr(module, SLOT_ATTR, None)
    prefix = slot.get() if slot is not None else None
    if prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    if kwargs.get("softcap") is not None:
        raise ValueError(f"prefix attention: {type(module).__name__} uses attention logit soft-capping, "
                         "which the prefix paths do not implement")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if isinstance(prefix, PlusLayer):  # Prefix-Tuning+: the model's own attention plus the gated memory
        return _plus_forward(module, query, key, value, attention_mask, prefix, scaling, dropout, kwargs), None
    pk, pv = prefix
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", False) if causal is None else bool(causal)
    mask = sequence_mask(module, attention_mask, query.shape[2], key.shape[2], query.device, causal=causal)
    return classic_prefix_attention(module, query, key, value, pk, pv, mask, causal=causal, scaling=scaling,
                                    dropout=dropout, bias=kwargs.get("position_bias")), None


def register() -> None:
    AttentionInterface.register(ATTN_IMPLEMENTATION, prefix_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


register()
