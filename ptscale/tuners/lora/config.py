"""The ``lora:`` section of a recipe (torch-free: read when the recipe is validated)."""

from __future__ import annotations

from dataclasses import dataclass

from ptscale.errors import RecipeError
from ptscale.models.groups import COMPONENTS
from ptscale.plans import documented


@dataclass
class LoraConfig:
    targets: dict[str, list[str]] = documented(help=(
        "modules per component (vision, qformer, language_model; BLIP: text_encoder, text_decoder; VinVL: bert; "
        "OFA: language_model) "
        "that get LoRA; names match module-path suffixes "
        "on a dot boundary, so 'query' alone would also take the cross-attention (`ptscale ls targets` lists "
        "them). Default: q, k, v of the self-attention of the Q-Former and of the language model (paper B.4: 'all "
        "query, key, and value projection matrices in the self-attention module'; README 'The embedded default' "
        "says why not the Q-Former alone)"), factory=lambda: {
        "qformer": ["attention.attention.query", "attention.attention.key", "attention.attention.value"],
        "language_model": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]})
    r: int = documented(16, "rank of the LoRA update")
    alpha: int = documented(32, "LoRA scaling numerator (the update is scaled by alpha / r)")
    dropout: float = documented(0.05, "dropout on the LoRA input, training only")


def check_lora(cfg: LoraConfig) -> None:
    for comp in cfg.targets:
        if comp not in COMPONENTS:
            raise RecipeError(f"lora.targets.{comp}: unknown component; known: {', '.join(COMPONENTS)}")
    if cfg.r <= 0:
        raise RecipeError(f"lora.r: must be > 0, got {cfg.r}")
    if cfg.alpha <= 0:
        raise RecipeError(f"lora.alpha: must be > 0 (the update is scaled by alpha / r), got {cfg.alpha}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise RecipeError(f"lora.dropout: must be in [0, 1), got {cfg.dropout}")
