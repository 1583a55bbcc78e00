"""Where prefixes go: target names -> the attention modules that take them, per architecture.

A target is a set of self-attention layers that share one prefix encoder (one prefix length):

=================  =============================================================================
model type         targets
=================  =============================================================================
blip-2             qformer (Q-Former self-attention; never its cross-attention to the image),
                   vision (ViT self-attention), language_model (every LM self-attention),
                   encoder / decoder (Flan-T5 language model only: its encoder / decoder
                   self-attention; never the decoder's cross-attention)
opt, llama, qwen2  language_model (every ``*.self_attn``; grouped-query attention: the prefix
                   lives on the KV heads)
t5                 encoder, decoder, language_model (= encoder + decoder)
blip               vision, encoder (BlipForQuestionAnswering's text encoder), decoder (text
                   decoder), language_model (= text encoder + decoder)
vinvl              bert (every BERT self-attention, over caption, tags and regions; the Oscar
                   mask is the module's own and still applies to the sequence keys)
ofa                encoder, decoder (every self-attention of OFA's encoder / decoder; never the
                   cross-attention), language_model (= both)
=================  =============================================================================

A module gets a prefix through one of two mechanisms (``mechanism``): the attention-interface hook
(``ptscale.prefix.attention``) when its ``forward`` dispatches through transformers' attention interface
(``ALL_ATTENTION_FUNCTIONS``) and ``set_attn_implementation`` reaches its config (BLIP-2, OPT, Llama, Qwen2,
T5, VinVL's BERT in transformers 5.23), or a module wrapper (``ptscale.prefix.wrapper``) for the classes that compute
attention themselves and have one (BLIP's ``BlipAttention`` and ``BlipTextSelfAttention``, OFA's
``OFAAttention``). Anything else
raises :class:`PrefixHookError` naming the module: a prefix is never silently dropped.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ptscale.models.families import BY_MODEL_TYPE, FAMILIES
from ptscale.prefix.wrapper import WRAPPERS


class PrefixHookError(RuntimeError):
    """A target's attention cannot take the prefix hook (or the model has no such target)."""


Layers = list[tuple[str, nn.Module]]


@dataclass(frozen=True)
class Target:
    """The layers of one target and their attention geometry."""

    name: str
    layers: Layers
    query_heads: int
    kv_heads: int
    head_dim: int


# --- finders: model -> [(module path, attention module)] ---------------------------------------------
def _lm_self_attention(lm: nn.Module, root: str) -> Layers:
    found = [(f"{root}{n}", m) for n, m in lm.named_modules() if n.endswith("self_attn")]
    if not found:
        raise PrefixHookError(f"no self-attention modules (*.self_attn) found in {type(lm).__name__}")
    return found


def _t5_self_attention(t5: nn.Module, root: str, stack: str) -> Layers:
    # T5Block.layer[0] is T5LayerSelfAttention; the decoder's layer[1] (cross-attention) gets no prefix.
    blocks = getattr(t5, stack).block
    return [(f"{root}{stack}.block.{i}.layer.0.SelfAttention", b.layer[0].SelfAttention)
            for i, b in enumerate(blocks)]


def _bert_self_attention(encoder: nn.Module, root: str) -> Layers:
    return [(f"{root}layer.{i}.attention.self", layer.attention.self) for i, layer in enumerate(encoder.layer)]


def _vit_self_attention(vision: nn.Module, root: str) -> Layers:
    return [(f"{root}encoder.layers.{i}.self_attn", layer.self_attn)
            for i, layer in enumerate(vision.encoder.layers)]


def _blip2_lm_is_t5(base: nn.Module) -> bool:
    return not base.config.use_decoder_only_language_model


def _blip2_lm(base: nn.Module, part: str) -> Layers:
    lm = base.language_model
    if not _blip2_lm_is_t5(base):
        if part != "language_model":
            raise PrefixHookError(f"prefix target {part!r}: BLIP-2's language model {type(lm).__name__} is "
                                  "decoder-only; use the target 'language_model'")
        return _lm_self_attention(lm, "language_model.")
    stacks = ("encoder", "decoder") if part == "language_model" else (part,)
    return [x for s in stacks for x in _t5_self_attention(lm, "language_model.", s)]


def _t5(base: nn.Module, part: str) -> Layers:
    stacks = ("encoder", "decoder") if part == "language_model" else (part,)
    return [x for s in stacks for x in _t5_self_attention(base, "", s)]


def _blip_text(base: nn.Module, part: str) -> Layers:
    found: Layers = []
    if part in ("encoder", "language_model") and hasattr(base, "text_encoder"):
        found += _bert_self_attention(base.text_encoder.encoder, "text_encoder.encoder.")
    if part in ("decoder", "language_model"):
        found += _bert_self_attention(base.text_decoder.bert.encoder, "text_decoder.bert.encoder.")
    if not found:
        raise PrefixHookError(f"prefix target {part!r}: {type(base).__name__} has no text encoder; "
                              "use 'decoder' (or 'language_model')")
    return found


def _blip2(base: nn.Module, target: str) -> Layers:
    if target == "qformer":
        return [(f"qformer.encoder.layer.{i}.attention.attention", layer.attention.attention)
                for i, layer in enumerate(base.qformer.encoder.layer)]
    if target == "vision":
        return _vit_self_attention(base.vision_model, "vision_model.")
    return _blip2_lm(base, target)


def _blip(base: nn.Module, target: str) -> Layers:
    if target == "vision":
        return _vit_self_attention(base.vision_model, "vision_model.")
    return _blip_text(base, target)


def _ofa(base: nn.Module, target: str) -> Layers:
    stacks = ("encoder", "decoder") if target == "language_model" else (target,)
    return [(f"{s}.layers.{i}.self_attn", layer.self_attn) for s in stacks
            for i, layer in enumerate(getattr(base, s).layers)]


# model type -> (model, target) -> its layers. The target names each family takes are defined with the family
# (ptscale.models.families.Family.prefix_targets); these find them.
FINDERS: dict[str, Callable[[nn.Module, str], Layers]] = {
    "blip-2": _blip2, "blip": _blip, "t5": _t5, "ofa": _ofa,
    "vinvl": lambda base, target: _bert_self_attention(base.bert.encoder, "bert.encoder."),
    **dict.fromkeys(("opt", "llama", "qwen2"), lambda base, target: _lm_self_attention(base, "")),
}


def find_layers(base: nn.Module, target: str) -> Layers:
    model_type = base.config.model_type
    if model_type not in FINDERS:
        raise PrefixHookError(f"no prefix targets known for model type {model_type!r} ({type(base).__name__}); "
                              f"supported: {', '.join(FINDERS)} (ptscale.prefix.targets.FINDERS)")
    targets = FAMILIES[BY_MODEL_TYPE[model_type]].prefix_targets
    if target not in targets:
        raise PrefixHookError(f"prefix target {target!r} does not exist for {model_type} ({type(base).__name__}); "
                              f"its targets: {', '.join(targets)}")
    layers = FINDERS[model_type](base, target)
    if not layers:
        raise PrefixHookError(f"prefix target {target!r}: no attention layers found in {type(base).__name__}")
    return layers


# --- checks and geometry ------------------------------------------------------------------------------
INTERFACE, WRAPPER = "interface hook", "module wrapper"
# Model types whose attention takes prefixes through wrappers only: their masks are built for their own
# (eager) attention, so ``set_attn_implementation`` must leave them alone.
WRAPPER_ONLY = ("blip", "ofa")


def mechanism(name: str, module: nn.Module) -> str:
    """How ``module`` takes its prefix: ``INTERFACE`` (it dispatches through the attention interface) or
    ``WRAPPER`` (``ptscale.prefix.wrapper`` has a wrapper for its class); else a :class:`PrefixHookError`."""
    if "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(type(module).forward):
        return INTERFACE
    if type(module) in WRAPPERS:
        return WRAPPER
    raise PrefixHookError(
        f"{name} ({type(module).__name__}) does not dispatch through transformers' attention interface and "
        "ptscale.prefix.wrapper has no wrapper for it, so a prefix cannot be injected there; remove this target "
        "from prefix.lengths")


def is_causal_layer(base: nn.Module, name: str) -> bool:
    """Whether a wrapped layer is causal (its own mask says so; this only lets the Triton kernel take it):
    BLIP's text decoder, OFA's decoder."""
    model_type = base.config.model_type
    return ((model_type == "blip" and name.startswith("text_decoder."))
            or (model_type == "ofa" and name.startswith("decoder.")))


def check_reached(name: str, module: nn.Module, implementation: str) -> None:
    """After ``set_attn_implementation``: the module's config must select our attention function."""
    got = getattr(getattr(module, "config", None), "_attn_implementation", None)
    if got != implementation:
        raise PrefixHookError(f"{name} ({type(module).__name__}) selects attention {got!r} after "
                              f"set_attn_implementation({implementation!r}), so its prefix would be ignored")


def _first(module: nn.Module, *names: str) -> int | None:
    for n in names:
        value = getattr(module, n, None)
        if isinstance(value, int):
            return value
    return None


def geometry(name: str, module: nn.Module) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) of an attention module, checked against its key projection."""
    head_dim = _first(module, "head_dim", "attention_head_size", "key_value_proj_dim")
    query_heads = _first(module, "num_heads", "num_attention_heads", "n_heads")
    if query_heads is None and hasattr(module, "config"):
        query_heads = module.config.num_attention_heads
    if head_dim is None or query_heads is None:
        raise PrefixHookError(f"{name} ({type(module).__name__}): cannot read its head count / head dim")
    kv_heads = query_heads // getattr(module, "num_key_value_groups", 1)  # grouped-query attention
    key_proj = next((p for p in (getattr(module, n, None) for n in ("k_proj", "key", "k")) if isinstance(p, nn.Linear)),
                    None)
    if key_proj is not None and key_proj.out_features != kv_heads * head_dim:
        raise PrefixHookError(f"{name} ({type(module).__name__}): key projection gives {key_proj.out_features} "
                              f"features, not {kv_heads} KV heads x {head_dim}")
    return query_heads, kv_heads, head_dim


def resolve(base: nn.Module, target: str) -> Target:
    """The target's layers (each checked to dispatch through the attention interface) and geometry."""
    layers = find_layers(base, target)
    shapes = set()
    for name, module in layers:
        mechanism(name, module)
        shapes.add(geometry(name, module))
    if len(shapes) != 1:
        raise PrefixHookError(f"prefix target {target!r}: its layers differ in attention geometry {sorted(shapes)}; "
                              "one prefix encoder needs one geometry")
    (query_heads, kv_heads, head_dim), = shapes
    return Target(target, layers, query_heads, kv_heads, head_dim)
