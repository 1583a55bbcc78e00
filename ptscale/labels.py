"""How runs are named in tables and figures: the plan and where its trained parameters sit.

Torch-free (read by ``ptscale report`` and ``ptscale grid`` as well as ``ptscale analyze``): two LoRA
placements are two different methods and must never share a label.
"""

from __future__ import annotations

from ptscale.config import RunConfig

_COMPONENTS = {"vision": "ViT", "qformer": "Q-Former", "language_model": "LM", "encoder": "LM encoder",
               "decoder": "LM decoder", "bert": "BERT"}
_BASE_GROUPS = ("vision", "qformer", "projection", "language_model")  # the "full" alias (models.groups)


def _full_groups(cfg: RunConfig) -> tuple[str, ...]:
    """What "full" trains: VinVL's BERT and projection, OFA's ResNet and encoder-decoder
    (ptscale.models.families), else BLIP-2's towers."""
    from ptscale.models.families import FAMILIES

    return FAMILIES[cfg.model.family].full if cfg.model.family in ("vinvl", "ofa") else _BASE_GROUPS


def _short_targets(targets: list[str]) -> str:
    """``attention.attention.query`` -> ``query``; whole names where the last parts would collide."""
    last = [t.rsplit(".", 1)[-1] for t in targets]
    return "/".join(last if len(set(last)) == len(last) else targets)


def placement(cfg: RunConfig) -> str:
    """Where the run's trained parameters sit: prefix lengths per target, LoRA rank and modules, adapters,
    fine-tuned towers; what a figure's reader needs to tell runs apart."""
    trained = {g for stage in cfg.stages for g in stage.train}
    parts = []
    if "prefix" in trained:
        parts.append("prefix " + ", ".join(f"{_COMPONENTS.get(t, t)} {n}" for t, n in cfg.prefix.lengths.items()
                                           if n > 0))
    if "lora" in trained:
        parts += [f"LoRA r{cfg.lora.r} {_COMPONENTS[c]} {_short_targets(t)}" for c, t in cfg.lora.targets.items() if t]
    if "adapter" in trained and cfg.adapter is not None:
        kind = "S-Adapter" if cfg.adapter.kind == "sequential" else "P-Adapter"
        parts.append(f"{kind} {'+'.join(_COMPONENTS[c] for c in cfg.adapter.components)}")
    full = _full_groups(cfg)
    tuned = [g for g in full if g in trained]
    if tuned:
        parts.append("full FT" if len(tuned) == len(full) else "tuned " + "+".join(
            _COMPONENTS.get(g, g) for g in tuned))
    return "; ".join(parts)


def run_label(cfg: RunConfig) -> str:
    """``prefix->lora (prefix Q-Former 8, LM 8; LoRA r16 Q-Former query/key/value)``: the plan (or the explicit
    stages' groups) and the placement, for legends."""
    plan = cfg.plan or " -> ".join("+".join(stage.train) for stage in cfg.stages)
    where = placement(cfg)
    return f"{plan} ({where})" if where else plan
