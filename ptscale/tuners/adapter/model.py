"""Finds each layer's adapter sites in a BLIP-2 component and swaps in the adapter wrappers.

Injected before the first DeepSpeed engine exists, like LoRA: ZeRO-3 partitions parameters at initialize,
and a parameter added later would never be sharded or optimised. Sizes come from ``in_features`` /
``out_features``, which stay true for a ZeRO-3 partitioned Linear (whose weight has local shape (0,)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ptscale.models.groups import COMPONENTS
from ptscale.prefix.model import PrefixTunedModel
from ptscale.tuners.adapter.config import KINDS, AdapterConfig
from ptscale.tuners.adapter.layer import (
    ADAPTER_LAYERS,
    Bottleneck,
    FFNInputTap,
    ParallelAdapterLinear,
    SequentialAdapterLinear,
)


@dataclass(frozen=True)
class LayerSites:
    """Module paths inside one transformer layer."""

    attn_out: str  # the attention output projection (self-attention only)
    ffn_in: str  # the FFN's first Linear: its input is the FFN input
    ffn_out: str  # the FFN's output Linear


# component -> (its root inside Blip2ForConditionalGeneration, the sites of each of its layers).
# The Q-Former's cross-attention to the image gets no adapter (as in AdapterHub's Houlsby config, where
# cross-attention adapters are off by default); its FFN is the query FFN (intermediate_query/output_query),
# the only one BLIP-2 runs: the text FFN exists only with use_qformer_text_input.
COMPONENT_SITES: dict[str, tuple[str, LayerSites]] = {
    "vision": ("vision_model", LayerSites("self_attn.projection", "mlp.fc1", "mlp.fc2")),
    "qformer": ("qformer", LayerSites("attention.output.dense", "intermediate_query.dense", "output_query.dense")),
    "language_model": ("language_model", LayerSites("self_attn.out_proj", "fc1", "fc2")),
    # BLIP's text towers (BERT layers; the cross-attention to the image gets no adapter, as in the Q-Former)
    "text_encoder": ("text_encoder", LayerSites("attention.output.dense", "intermediate.dense", "output.dense")),
    "text_decoder": ("text_decoder", LayerSites("attention.output.dense", "intermediate.dense", "output.dense")),
    "bert": ("bert", LayerSites("attention.output.dense", "intermediate.dense", "output.dense")),  # VinVL's BERT
}


@dataclass(frozen=True)
class Site:
    """One adapter: where it goes (full module name) and its input/output widths."""

    name: str
    d_in: int
    d_out: int
    ffn_in: str | None = None  # parallel only: the Linear whose input the adapter reads


@dataclass(frozen=True)
class AdapterInjection:
    bottleneck: int
    num_params: int
    modules: list[str]  # wrapped module names, as in model.named_modules()


def _backbone(model: nn.Module) -> tuple[nn.Module, str]:
    """The Blip2ForConditionalGeneration and the name prefix of its modules inside ``model``."""
    if isinstance(model, PrefixTunedModel):
        return model.base, "base."
    return model, ""


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _layers(backbone: nn.Module, component: str) -> list[tuple[str, nn.Module]]:
    """The component's transformer layers: the modules that hold all three sites (found by structure, so
    ``language_model.model.decoder.layers`` and ``language_model.decoder.layers`` both work)."""
    root_name, sites = COMPONENT_SITES[component]
    if component == "language_model" and not hasattr(backbone, root_name):
        root_name = ""  # OFA: the whole encoder-decoder is its language model (layers with the same sites)
    root = backbone.get_submodule(root_name)
    paths = (sites.attn_out, sites.ffn_in, sites.ffn_out)
    found = [(f"{root_name}.{n}".lstrip("."), m) for n, m in root.named_modules()
             if n and all(_has(m, p) for p in paths)]
    if not found:
        raise ValueError(f"adapter.components: no layer of {root_name or 'the model'} ({type(root).__name__}) has "
                         f"{', '.join(paths)}; this architecture is not supported")
    return found


def _width(module: nn.Module, attr: str, name: str) -> int:
    value = getattr(module, attr, None)
    if not isinstance(value, int):
        raise TypeError(f"adapter site {name} ({type(module).__name__}) has no integer {attr}; expected a Linear")
    return value


def adapter_sites(model: nn.Module, components: str | Sequence[str], kind: str) -> list[Site]:
    """Every adapter that ``kind`` puts into ``components``: sequential, one after each layer's attention
    output projection and one after its FFN output (Houlsby); parallel, one beside each layer's FFN (He)."""
    if kind not in KINDS:
        raise ValueError(f"adapter.kind: {kind!r} is not one of {', '.join(KINDS)}")
    comps = [components] if isinstance(components, str) else list(components)
    for comp in comps:
        if comp not in COMPONENTS:
            raise ValueError(f"adapter.components: unknown component {comp!r}; known: {', '.join(COMPONENTS)}")
    backbone, prefix = _backbone(model)
    sites: list[Site] = []
    for comp in comps:
        layout = COMPONENT_SITES[comp][1]
        for layer_name, layer in _layers(backbone, comp):
            full = f"{prefix}{layer_name}."
            ffn_out = layer.get_submodule(layout.ffn_out)
            if kind == "sequential":
                for path in (layout.attn_out, layout.ffn_out):
                    width = _width(layer.get_submodule(path), "out_features", full + path)
                    sites.append(Site(full + path, width, width))
            else:
                ffn_in = layer.get_submodule(layout.ffn_in)
                sites.append(Site(full + layout.ffn_out, _width(ffn_in, "in_features", full + layout.ffn_in),
                                  _width(ffn_out, "out_features", full + layout.ffn_out), full + layout.ffn_in))
    return sites


def adapter_param_count(model: nn.Module, components: str | Sequence[str], kind: str, bottleneck: int) -> int:
    """Parameters the adapters of this kind and bottleneck would have (or have, once injected)."""
    return sum(Bottleneck.num_params(s.d_in, s.d_out, bottleneck) for s in adapter_sites(model, components, kind))


def bottleneck_for_budget(model: nn.Module, components: str | Sequence[str], kind: str, target_params: int) -> int:
    """The bottleneck (>= 1) whose adapter parameter count is closest to ``target_params``; ties go to the
    smaller one. The count is affine in the bottleneck b: sum over sites of b*(d_in + d_out + 1) + d_out."""
    if target_params <= 0:
        raise ValueError(f"adapter.budget: must be > 0, got {target_params}")
    sites = adapter_sites(model, components, kind)
    slope = sum(s.d_in + s.d_out + 1 for s in sites)
    fixed = sum(s.d_out for s in sites)  # the up-projection biases, independent of b
    lower = max(1, (target_params - fixed) // slope)
    candidates = (lower, lower + 1)
    return min(candidates, key=lambda b: (abs(slope * b + fixed - target_params), b))


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, ADAPTER_LAYERS) for m in model.modules())


def _linear(model: nn.Module, name: str) -> nn.Linear:
    module = model.get_submodule(name)
    if isinstance(module, ADAPTER_LAYERS):
        raise ValueError(f"{name} already has an adapter; inject adapters once")
    if type(module) is not nn.Linear:
        raise TypeError(f"{name} is a {type(module).__name__}, not a plain nn.Linear: an adapter wraps the Linear "
                        "itself (inject adapters before anything else wraps it, e.g. LoRA)")
    return module


def inject_adapters(model: nn.Module, cfg: AdapterConfig) -> AdapterInjection:
    """Wraps every site's Linear; the model's outputs are unchanged until the adapters train (zero up-proj)."""
    bottleneck = cfg.bottleneck or bottleneck_for_budget(model, cfg.components, cfg.kind, cfg.budget)
    sites = adapter_sites(model, cfg.components, cfg.kind)
    targets = [_linear(model, s.name) for s in sites]  # every check before the first swap: no half-injected model
    for site, linear in zip(sites, targets, strict=True):
        adapter = Bottleneck(site.d_in, site.d_out, bottleneck, nonlinearity=cfg.nonlinearity, dropout=cfg.dropout,
                             dtype=linear.weight.dtype, device=linear.weight.device)
        if cfg.kind == "sequential":
            wrapper: nn.Module = SequentialAdapterLinear(linear, adapter, cfg.scale)
        else:
            tap = FFNInputTap()
            model.get_submodule(site.ffn_in).register_forward_pre_hook(tap)
            wrapper = ParallelAdapterLinear(linear, adapter, cfg.scale, tap)
        parent_name, _, child = site.name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, wrapper)
    num_params = sum(Bottleneck.num_params(s.d_in, s.d_out, bottleneck) for s in sites)
    return AdapterInjection(bottleneck=bottleneck, num_params=num_params, modules=[s.name for s in sites])
