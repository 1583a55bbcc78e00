"""LoRA through peft, injected into named modules of each component.

Injected before the first DeepSpeed engine exists (ZeRO-3 partitions parameters at initialize, and a
parameter added later would never be sharded or optimised). LoRA B starts at zero, so the adapters
change nothing until a stage trains them.
"""

from __future__ import annotations

import re

from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from torch import nn

from ptscale.tuners.lora.config import LoraConfig

# Where each component lives inside PrefixTunedModel.
COMPONENT_ROOTS = {"vision": "base.vision_model.", "qformer": "base.qformer.", "language_model": "base.language_model.",
                   "text_encoder": "base.text_encoder.", "text_decoder": "base.text_decoder.",  # these two: BLIP
                   "bert": "base.bert."}  # VinVL


def component_root(model: nn.Module, component: str) -> str:
    """Where ``component`` lives: BLIP-2's, BLIP's or VinVL's towers, or a standalone language model (the whole
    base)."""
    base = getattr(model, "base", model)
    towers = [c for c, root in COMPONENT_ROOTS.items() if hasattr(base, root.split(".")[1])]
    if towers:  # a multimodal model (a standalone language model has none of these: it is the whole base)
        if component not in towers:  # BLIP has no qformer, BLIP-2 no text_decoder, VinVL only bert
            raise ValueError(f"lora.targets.{component}: a {base.config.model_type} model has no {component}; "
                             f"its components: {', '.join(towers)}")
        return COMPONENT_ROOTS[component]
    if component != "language_model":
        raise ValueError(f"lora.targets.{component}: a {base.config.model_type} language model has no {component}; "
                         "use lora.targets.language_model")
    return "base."


def lora_target_modules(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Full module names: a target name matches a module path suffix on a dot boundary
    (``attention.attention.query`` matches the Q-Former's self-attention, not its cross-attention)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    found: list[str] = []
    for component, targets in cfg.targets.items():
        root = component_root(model, component)
        for target in targets:
            pattern = re.compile(rf"(^|\.){re.escape(target)}$")
            hits = [n for n in names if n.startswith(root) and pattern.search(n[len(root):])]
            if not hits:
                raise ValueError(f"lora.targets.{component}: {target!r} matches no Linear module under "
                                 f"{root.rstrip('.')}; check the module names (model.named_modules())")
            found += hits
    return sorted(set(found))


def inject_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    targets = lora_target_modules(model, cfg)
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets)
    inject_adapter_in_model(peft_cfg, model)
    return targets
