"""Named parameter groups: the unit a stage freezes or trains.

Every parameter of a wrapped model belongs to exactly one group. Matching is by module path, first
rule wins, so LoRA weights inside the Q-Former are ``lora`` and not ``qformer``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # the group names are read by recipe validation, before torch is imported
    from torch import nn

# (group, pattern on the parameter name of ptscale.prefix.model.PrefixTunedModel)
_RULES: tuple[tuple[str, str], ...] = (
    ("prefix", r"^prefixes\."),
    ("lora", r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\."),
    ("adapter", r"\.ptscale_adapter\."),
    ("embeddings", r"language_model\.(model\.)?(decoder\.)?(embed_tokens|embed_positions|shared)\."),
    # BLIP: word and position embeddings of its text encoder / decoder; the decoder's prediction head
    ("embeddings", r"^base\.text_(encoder|decoder\.bert)\.embeddings\.(word|position)_embeddings\."),
    # VinVL: its BERT's word and position embeddings; the masked-token head
    ("embeddings", r"^base\.bert\.embeddings\.(word|position)_embeddings\."),
    ("lm_head", r"language_model\.lm_head\.|^base\.text_decoder\.cls\.|^base\.cls\."),
    # OFA: the shared word embeddings and the position tables; its output projection (tied to the embeddings in
    # the released models); its ResNet image embedding with the projection of its cells; the rest of its
    # encoder-decoder is its language model
    ("embeddings", r"^base\.(encoder|decoder)\.(embed_tokens|embed_positions|embed_image_positions)\."),
    ("lm_head", r"^base\.decoder\.output_projection\."),
    ("vision", r"^base\.encoder\.(embed_images|image_proj|patch_layernorm_embedding)\."),
    ("projection", r"^base\.bert\.(img_embedding|LayerNorm)\."),  # VinVL's region-feature projection
    ("bert", r"^base\.bert\."),  # VinVL's BERT (Oscar+): caption, tags and regions
    ("vision", r"^base\.vision_model\."),
    ("qformer", r"^base\.(qformer\.|query_tokens$)"),
    ("projection", r"^base\.language_projection\."),
    ("language_model", r"^base\.language_model\."),
    ("text_encoder", r"^base\.text_encoder\."),  # BLIP VQA's question encoder (BERT with cross-attention)
    ("text_decoder", r"^base\.text_decoder\."),  # BLIP's caption / answer decoder
    # a standalone language model (OPT, Llama, Qwen2: base.model.*, base.lm_head; T5: base.shared, encoder, decoder)
    ("embeddings", r"^base\.(model\.)?(decoder\.)?(embed_tokens|embed_positions|shared)\."),
    ("lm_head", r"^base\.lm_head\."),
    ("language_model", r"^base\.(model|encoder|decoder)\."),
)
GROUPS: tuple[str, ...] = tuple(dict.fromkeys(g for g, _ in _RULES))
# The model's towers that take tuners (LoRA targets, adapter components): themselves parameter groups.
Component = Literal["vision", "qformer", "language_model", "text_encoder", "text_decoder", "bert"]
COMPONENTS: tuple[str, ...] = ("vision", "qformer", "language_model", "text_encoder", "text_decoder", "bert")
# "full": full fine-tuning; word embeddings and the LM head stay frozen (paper appendix B.5). BLIP-2's towers here;
# a model family's own "full" (BLIP's vision and text towers, a language model's) is in ptscale.models.families.
GROUP_ALIASES: dict[str, tuple[str, ...]] = {"full": ("vision", "qformer", "projection", "language_model")}


def expand_groups(names: list[str], aliases: dict[str, tuple[str, ...]] | None = None) -> list[str]:
    """Aliases replaced by their groups (``aliases``: a model family's own, e.g. a language model's full)."""
    table = {**GROUP_ALIASES, **(aliases or {})}
    out: list[str] = []
    for name in names:
        for group in table.get(name, (name,)):
            if group not in out:
                out.append(group)
    return out


_COMPILED = tuple((g, re.compile(p)) for g, p in _RULES)


def group_of(name: str) -> str:
    for group, pattern in _COMPILED:
        if pattern.search(name):
            return group
    raise KeyError(f"parameter {name!r} matches no parameter group; groups: {', '.join(GROUPS)}")


def params_in(model: nn.Module, groups: set[str] | list[str]) -> Iterator[tuple[str, nn.Parameter]]:
    wanted = set(groups)
    for name, p in model.named_parameters():
        if group_of(name) in wanted:
            yield name, p


def numel(p: nn.Parameter) -> int:
    """Full logical size: also for a ZeRO-3 partitioned parameter (whose local shape is (0,)) and for a
    bitsandbytes 4-bit weight (stored packed, two values per byte; its quant_state keeps the real shape)."""
    if (state := getattr(p, "quant_state", None)) is not None:
        return state.shape.numel()
    return int(p.ds_numel) if hasattr(p, "ds_numel") else p.numel()


def is_quantized(p: nn.Parameter) -> bool:
    """A bitsandbytes-quantised weight (Params4bit, Int8Params): frozen by construction."""
    return type(p).__name__ in ("Params4bit", "Int8Params")


def group_sizes(model: nn.Module) -> dict[str, int]:
    sizes = dict.fromkeys(GROUPS, 0)
    for name, p in model.named_parameters():
        sizes[group_of(name)] += numel(p)
    return sizes


def check_trainable(model: nn.Module, groups: list[str], where: str) -> None:
    """The one model-level quantisation guard: weights stored quantized (bitsandbytes) cannot train. Called when
    the model is built (every stage, before any compute) and again when a stage sets what trains."""
    for name, p in params_in(model, groups):
        if is_quantized(p):
            from ptscale.errors import RecipeError

            raise RecipeError(f"{where}: {sorted(set(groups))} includes weights stored quantized (model.quantization), "
                              f"e.g. {name}; they cannot train: train prefix / lora / adapter on a quantized base")


def set_trainable(model: nn.Module, groups: list[str]) -> tuple[int, int]:
    """requires_grad = (group in groups); returns (trainable, total) element counts."""
    check_trainable(model, groups, "stage")
    wanted = set(groups)
    trainable = total = 0
    for name, p in model.named_parameters():
        on = group_of(name) in wanted
        p.requires_grad_(on)
        total += numel(p)
        trainable += numel(p) if on else 0
    return trainable, total


def check_stage_changes(before: dict[str, str], after: dict[str, str], trained: list[str], stage: str) -> None:
    """Parameter digests around a stage: frozen groups must be bit-identical, and a trained group none of whose
    parameters moved means the stage trained nothing (the silent ZeRO-3 failure mode)."""
    changed = {n for n in before if before[n] != after[n]}
    leaked = sorted(n for n in changed if group_of(n) not in trained)
    if leaked:
        raise RuntimeError(f"[{stage}] frozen parameters changed: {leaked[:5]} (+{max(0, len(leaked) - 5)})")
    for group in trained:
        members = [n for n in before if group_of(n) == group]
        if members and not any(n in changed for n in members):
            raise RuntimeError(f"[{stage}] group {group!r} was set to train but no parameter of it changed")
