"""The ``prefix:`` section of a recipe (torch-free: read when the recipe is validated)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ptscale.errors import RecipeError
from ptscale.models.families import PREFIX_TARGETS
from ptscale.plans import documented


@dataclass
class PrefixConfig:
    lengths: dict[str, int] = documented(help=(
        "prefix length per target module; 0 or absent = no prefix there (BLIP-2 captioning: 8 / 8, paper table "
        "8). Targets: qformer, vision, language_model (every LM self-attention), and for encoder-decoder LMs (T5) "
        "encoder / decoder separately (also OFA's); VinVL: bert (its BERT self-attention)"),
        factory=lambda: {"qformer": 8, "language_model": 8})
    kind: Literal["classic", "plus"] = documented("classic", (
        "classic: prefix keys/values inside the softmax (Li & Liang); plus: Prefix-Tuning+ (a gated "
        "linear-attention memory outside the softmax, ptscale.prefix.plus)"))
    encoder: Literal["mlp", "linear", "none"] = documented("mlp", (
        "mlp: Linear-Tanh-Linear re-parameterisation (paper fig. 6); linear: one linear projection (table 10 "
        "'w/o MLP'); none: raw per-layer key/value parameters (table 10 'w/o encoder')"))
    encoder_hidden: int = documented(64, "width of the MLP re-parameterisation; 64 suits the tiny default model "
                                     "(Li & Liang used 512 for GPT-2 medium: set it for a real model)")
    type_embedding: bool = documented(True, "the paper's prefix type embedding (appendix B.1, fig. 6; table 10 "
                                      "ablation)")
    init_std: float = documented(0.02, "standard deviation of the prefix parameters' initialisation")
    feature_map: Literal["elu1", "relu", "identity"] = documented("elu1", "kind=plus only: phi of the memory term")
    positions: Literal["shift", "keep"] = documented("shift", (
        "position ids of the real tokens of a decoder-only LM with a language_model prefix of length P: shift = "
        "P..P+L-1 (Li & Liang 2021, HF PEFT: the prefix occupies the first positions); keep = 0..L-1 "
        "(README 'Prefixes')"))


def check_prefix(cfg: PrefixConfig) -> None:
    for target, length in cfg.lengths.items():
        if target not in PREFIX_TARGETS:
            raise RecipeError(f"prefix.lengths.{target}: unknown target; known: {', '.join(PREFIX_TARGETS)}")
        if length < 0:
            raise RecipeError(f"prefix.lengths.{target}: must be >= 0, got {length}")
    if cfg.encoder == "mlp" and cfg.encoder_hidden <= 0:
        raise RecipeError(f"prefix.encoder_hidden: must be > 0 for the mlp encoder, got {cfg.encoder_hidden}")
    if cfg.init_std < 0:
        raise RecipeError(f"prefix.init_std: must be >= 0, got {cfg.init_std}")
    if cfg.kind == "classic" and cfg.feature_map != "elu1":
        raise RecipeError("prefix.feature_map: only used by prefix.kind=plus; remove it or set kind: plus")
