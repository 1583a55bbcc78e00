"""PrefixTunedModel: a transformers model plus one prefix module per target.

Each forward (and each ``generate``) first calls the prefix modules, then the wrapped model; every
prefixed attention layer reads its slice through the attention hook (``ptscale.prefix.attention``) or, where
the model's attention does not dispatch through the interface (BLIP), through the module wrapper that
replaced it (``ptscale.prefix.wrapper``).
The Q-Former has no ``past_key_values``, which is why the prefix enters at the attention interface;
the same hook serves T5's encoder (which a past-key-values prefix cannot reach either), gradient
checkpointing (the hook re-reads the stored prefixes on recomputation) and the KV cache (the cache
holds sequence keys only; the prefix is added on every call).

``self.prefixes[target]`` is a :class:`PrefixEncoder` (classic) or a :class:`PlusPrefix`
(Prefix-Tuning+, holding the encoder as ``source``); :meth:`PrefixTunedModel.fold_prefixes` swaps
each encoder for a :class:`FoldedPrefix`. Analysis switches (paper table 5): :meth:`prefixes_disabled`
and :meth:`prefixes_replaced_by_noise`.

The base model is frozen by default (``freeze_base=False`` to opt out): prefix-tuning trains the prefixes only.
``cfg.positions`` numbers the real tokens of a decoder-only language model that carries a ``language_model``
prefix of length P: ``shift`` (P..P+L-1, Li & Liang 2021 and HF PEFT, as if the prefix were the first P tokens)
or ``keep`` (0..L-1). It is applied by a forward pre-hook on the LM's decoder stack, which offsets the
``position_ids`` it receives (or would compute) by P; with the prefixes disabled nothing is shifted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ptscale.dist import gathered
from ptscale.models.groups import numel
from ptscale.prefix.attention import ATTN_IMPLEMENTATION, PrefixSlot, PrefixStore, attach
from ptscale.prefix.config import PrefixConfig
from ptscale.prefix.encoder import FoldedPrefix, PrefixEncoder, PrefixShape
from ptscale.prefix.plus import PlusPrefix, PlusState
from ptscale.prefix.targets import (
    WRAPPER,
    WRAPPER_ONLY,
    PrefixHookError,
    check_reached,
    is_causal_layer,
    mechanism,
    resolve,
)
from ptscale.prefix.wrapper import wrap

__all__ = ["PrefixHookError", "PrefixTunedModel", "matched_norm_noise", "prefix_parameter_report"]

LM_TARGET = "language_model"
# Decoder-only LM families and how each numbers its tokens when no position_ids are given.
CUMSUM_POSITIONS = ("opt",)  # from the attention mask: cumsum(mask) - 1, padding -1
ARANGE_POSITIONS = ("llama", "qwen2")  # past length + arange(L), padding included


def position_family(base: nn.Module) -> str | None:
    """The decoder-only LM family whose positions ``prefix.positions`` governs, or None (T5, none)."""
    cfg = base.config
    if cfg.model_type == "blip-2":
        if not cfg.use_decoder_only_language_model:
            return None
        cfg = cfg.text_config
    return cfg.model_type if cfg.model_type in CUMSUM_POSITIONS + ARANGE_POSITIONS else None


def default_position_ids(family: str, kwargs: dict) -> torch.Tensor:
    """The position ids the decoder stack computes itself when given none (transformers 5.23's OPTDecoder,
    LlamaModel, Qwen2Model), from the same keyword arguments."""
    embeds, ids = kwargs.get("inputs_embeds"), kwargs.get("input_ids")
    x = embeds if embeds is not None else ids
    cache = kwargs.get("past_key_values")
    seen = cache.get_seq_length() if cache is not None else 0
    length = x.shape[1]
    if family in ARANGE_POSITIONS:
        return (torch.arange(length, device=x.device) + seen).unsqueeze(0)
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones(x.shape[0], seen + length, device=x.device)
    if mask.dim() != 2:
        raise RuntimeError(f"prefix.positions=shift: a {mask.dim()}-D attention mask reached the {family} decoder; "
                           "pass position_ids or a 2-D mask")
    positions = (torch.cumsum(mask, dim=1) * mask - 1).long()
    return positions[:, seen:]


class PrefixTunedModel(nn.Module):
    """``base`` plus ``prefixes`` (a module per target). Parameter names start with ``base.`` or
    ``prefixes.``, which is what the parameter groups (``ptscale.models.groups``) match on."""

    def __init__(self, base: nn.Module, cfg: PrefixConfig, *, freeze_base: bool = True) -> None:
        """``freeze_base``: set ``requires_grad=False`` on every base parameter (the default: prefix-tuning trains
        the prefixes only; a recipe's stages set the trainable groups themselves either way)."""
        super().__init__()
        if freeze_base:
            for p in base.parameters():
                p.requires_grad_(False)
        self.base = base
        self.prefixes = nn.ModuleDict()
        self.kind = cfg.kind
        self.positions = cfg.positions
        self._store = PrefixStore()
        self._noise_seed: int | None = None
        # Dormant prefixes take no part in any forward: a plan whose prefix stage comes later (X->prefix)
        # trains X on the unprefixed model, as the paper's reverse order does.
        self.dormant = False
        targets = [(resolve(base, t), n) for t, n in cfg.lengths.items() if n > 0]
        owner: dict[str, str] = {}
        for target, _ in targets:
            for name, _module in target.layers:
                if name in owner:
                    raise PrefixHookError(f"{name} is in both prefix targets {owner[name]!r} and {target.name!r}; "
                                          "give it a prefix length in one of them only")
                owner[name] = target.name
        if base.config.model_type not in WRAPPER_ONLY:  # BLIP keeps its eager masks: its own attention reads them
            base.set_attn_implementation(ATTN_IMPLEMENTATION)
        for target, length in targets:
            for idx, (name, module) in enumerate(target.layers):
                if mechanism(name, module) == WRAPPER:  # replaced in place by a wrapper that owns no weights
                    module = wrap(base, name, module, causal=is_causal_layer(base, name))
                else:
                    check_reached(name, module, ATTN_IMPLEMENTATION)
                attach(module, PrefixSlot(self._store, target.name, idx))
            shape = PrefixShape(num_layers=len(target.layers), num_heads=target.kv_heads, head_dim=target.head_dim,
                                length=length)
            encoder = PrefixEncoder(shape, encoder=cfg.encoder, hidden=cfg.encoder_hidden,
                                    type_embedding=cfg.type_embedding, init_std=cfg.init_std)
            self.prefixes[target.name] = (PlusPrefix(encoder, target.query_heads, cfg.feature_map)
                                          if cfg.kind == "plus" else encoder)
        lm = next((t for t, _ in targets if t.name == LM_TARGET), None)
        self._position_family = position_family(base) if lm is not None and cfg.kind == "classic" else None
        if self._position_family is not None:
            owner = lm.layers[0][0].rsplit(".layers.", 1)[0]  # the decoder stack that computes position ids
            base.get_submodule(owner).register_forward_pre_hook(self._shift_positions, with_kwargs=True)

    def lm_prefix_length(self) -> int:
        """P of the ``language_model`` prefix (0 without one)."""
        module = self.prefixes[LM_TARGET] if LM_TARGET in self.prefixes else None
        return 0 if module is None else module.shape.length

    def position_offset(self) -> int:
        """What is added to the real tokens' position ids now: P under ``positions=shift`` with the prefixes
        enabled, else 0."""
        if self.positions != "shift" or self._position_family is None or not self._store.enabled or self.dormant:
            return 0
        return self.lm_prefix_length()

    def _shift_positions(self, module: nn.Module, args: tuple, kwargs: dict):
        offset = self.position_offset()
        if not offset:
            return None
        if args:
            raise RuntimeError(f"prefix.positions=shift: {type(module).__name__} was called with positional "
                               "arguments; cannot find its position_ids")
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = default_position_ids(self._position_family, kwargs)
        # Padding positions (OPT numbers them -1) stay as they are: PEFT leaves them there too, and they are masked.
        kwargs["position_ids"] = torch.where(positions >= 0, positions + offset, positions)
        return args, kwargs

    @property
    def config(self):
        return self.base.config

    # --- running ---------------------------------------------------------------------------------------
    def _activate(self) -> None:
        # Kept until the next call: gradient checkpointing re-reads them during backward.
        noise = None if self._noise_seed is None else torch.Generator().manual_seed(self._noise_seed)
        active: dict[str, torch.Tensor | PlusState] = {}
        for target, module in ({} if self.dormant else self.prefixes).items():
            out = module()  # a module call: ZeRO-3 gathers its parameters through its hooks
            kv, gate = out if isinstance(out, tuple) else (out, None)
            if noise is not None:
                kv = matched_norm_noise(kv, noise)
            active[target] = kv if gate is None else PlusState(kv, gate, module.feature_map)
        self._store.active = active

    def forward(self, image_embeds: torch.Tensor | None = None, **batch):
        """``image_embeds``: cached vision-encoder outputs (ptscale.models.feature_cache) instead of
        ``pixel_values``; BLIP-2 then runs from its Q-Former on."""
        self._activate()
        if image_embeds is not None:
            from ptscale.models.feature_cache import blip2_forward_with_image_features, blip2_image_features

            with gathered(list(self.base.parameters(recurse=False))):
                image = blip2_image_features(self.base, image_embeds)
            return blip2_forward_with_image_features(self.base, image, batch)
        return self.base(**batch)

    @torch.no_grad()
    def generate(self, **kwargs) -> torch.Tensor:
        self._activate()
        with gathered(list(self.base.parameters(recurse=False))):
            return self.base.generate(**kwargs)

    # --- analysis (paper table 5) ----------------------------------------------------------------------
    @contextlib.contextmanager
    def prefixes_disabled(self) -> Iterator[None]:
        """Run the wrapped model as if it had no prefix (analysis, table 5 of the paper)."""
        self._store.enabled = False
        try:
            yield
        finally:
            self._store.enabled = True

    @contextlib.contextmanager
    def prefixes_replaced_by_noise(self, seed: int) -> Iterator[None]:
        """Replace every prefix key/value block by Gaussian noise of the same Frobenius norm, per target,
        layer and K/V (table 5, "-Prefix +Noise"), without retraining. The same seed gives the same noise.
        Prefix-Tuning+ keeps its trained gates; only the memory keys/values become noise."""
        previous, self._noise_seed = self._noise_seed, seed
        try:
            yield
        finally:
            self._noise_seed = previous

    # --- folding ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def fold_prefixes(self) -> None:
        """Replace each prefix encoder by its output, static keys/values (appendix B.1): same outputs, no
        encoder compute. Parameters created here are new objects: fold before building an optimizer or a
        DeepSpeed engine, or for inference and export."""
        for target in list(self.prefixes):
            module = self.prefixes[target]
            source = module.source if isinstance(module, PlusPrefix) else module
            if isinstance(source, FoldedPrefix):
                continue
            folded = FoldedPrefix(source())  # the encoder's own forward
            folded.kv.requires_grad_(any(p.requires_grad for p in source.parameters()))
            if isinstance(module, PlusPrefix):
                module.source = folded
            else:
                self.prefixes[target] = folded

    def folded(self) -> dict[str, bool]:
        """target -> whether its prefix is folded (static keys/values)."""
        return {t: isinstance(m.source if isinstance(m, PlusPrefix) else m, FoldedPrefix)
                for t, m in self.prefixes.items()}


def matched_norm_noise(kv: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard-normal noise shaped like ``kv`` (layers, 2, H, P, D), each [layer, K/V] block rescaled to
    that block's Frobenius norm. Drawn on the CPU in float32 (device-independent), then cast."""
    noise = torch.randn(kv.shape, generator=generator, dtype=torch.float32).to(device=kv.device, dtype=kv.dtype)
    target = kv.detach().flatten(2).norm(dim=-1)  # (layers, 2)
    current = noise.flatten(2).norm(dim=-1).clamp_min(torch.finfo(noise.dtype).tiny)
    return noise * (target / current)[:, :, None, None, None]


def prefix_parameter_report(model: PrefixTunedModel) -> dict[str, dict[str, float | int]]:
    """target -> {"params": trainable-prefix elements of that target, "share": params / all model params}.
    Counts full sizes under ZeRO-3 (``ds_numel``)."""
    total = sum(numel(p) for p in model.parameters())
    report: dict[str, dict[str, float | int]] = {}
    for target, module in model.prefixes.items():
        n = sum(numel(p) for p in module.parameters())
        report[target] = {"params": n, "share": n / total}
    return report
