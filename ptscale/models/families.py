"""Model families a recipe can train, and how a checkpoint's family is found (torch-free: read when the recipe
is validated).

A family is named by ``model.family`` or detected from a checkpoint's ``config.json`` ``model_type``:

=======  ============  ==============================  ==========================  ===========================
family   model_type    loaded as                       prefix targets (default)    LoRA targets (default)
=======  ============  ==============================  ==========================  ===========================
blip2    blip-2        Blip2ForConditionalGeneration   qformer 8, language_model 8  Q-Former self-attn q, k, v
blip     blip          BlipForConditionalGeneration    decoder 8                   text decoder self-attn q, v
                       / BlipForQuestionAnswering      (VQA: encoder 8 too)
vinvl    vinvl (or an  ptscale.models.vinvl            bert 8                      BERT self-attn query, value
         Oscar bert)   .VinVLForCaptioning
ofa      ofa           ptscale.models.ofa.OFAModel     language_model 8 (encoder   q_proj, v_proj (every
                                                       + decoder self-attn)        attention)
opt      opt           AutoModelForCausalLM            language_model 8            q_proj, v_proj
llama    llama         AutoModelForCausalLM            language_model 8            q_proj, v_proj
qwen2    qwen2         AutoModelForCausalLM            language_model 8            q_proj, v_proj
t5       t5            AutoModelForSeq2SeqLM           language_model 8            q, v (self- and cross-attn)
=======  ============  ==============================  ==========================  ===========================

The LoRA defaults of the language models are the q / v projections of every attention layer (Hu et al. 2021,
the original LoRA placement; also HF PEFT's default for these architectures).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ptscale.errors import DataError, RecipeError


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str  # config.json's model_type
    kind: str  # "vision-language", "causal-lm" or "seq2seq-lm"
    groups: tuple[str, ...]  # the parameter groups its models have (ptscale.models.groups)
    full: tuple[str, ...]  # what the group alias "full" trains (word embeddings and LM head stay frozen)
    prefix_lengths: dict[str, int] = field(default_factory=dict)
    lora_targets: dict[str, list[str]] = field(default_factory=dict)
    # prefix.lengths keys its models take (ptscale.prefix.targets finds their attention modules)
    prefix_targets: tuple[str, ...] = ("language_model",)

    @property
    def is_language_model(self) -> bool:
        return self.kind != "vision-language"


_TUNERS = ("prefix", "lora", "adapter")
_LM_GROUPS = ("prefix", "lora", "embeddings", "lm_head", "language_model")
_QV = {"language_model": ["q_proj", "v_proj"]}

FAMILIES: dict[str, Family] = {
    "blip2": Family("blip2", "blip-2", "vision-language",
                    (*_TUNERS, "embeddings", "lm_head", "vision", "qformer", "projection", "language_model"),
                    ("vision", "qformer", "projection", "language_model"),
                    # encoder / decoder: a Flan-T5 language model's own stacks
                    prefix_targets=("qformer", "vision", "language_model", "encoder", "decoder")),
    # BLIP (ptscale.models.blip): captioning or VQA by the checkpoint's architecture; prefixes through module wrappers
    "blip": Family("blip", "blip", "vision-language",
                   (*_TUNERS, "embeddings", "lm_head", "vision", "text_encoder", "text_decoder"),
                   ("vision", "text_encoder", "text_decoder"), {"decoder": 8},
                   {"text_decoder": ["attention.self.query", "attention.self.value"]},
                   prefix_targets=("vision", "encoder", "decoder", "language_model")),
    # VinVL / Oscar+ (ptscale.models.vinvl): BERT over caption, tags and region features; prefixes through the hook
    "vinvl": Family("vinvl", "vinvl", "vision-language", (*_TUNERS, "embeddings", "lm_head", "bert", "projection"),
                    ("bert", "projection"), {"bert": 8}, {"bert": ["attention.self.query", "attention.self.value"]},
                    prefix_targets=("bert",)),
    # OFA (ptscale.models.ofa): ResNet image embedding + encoder-decoder; prefixes through module wrappers
    "ofa": Family("ofa", "ofa", "vision-language", (*_TUNERS, "embeddings", "lm_head", "vision", "language_model"),
                  ("vision", "language_model"), {"language_model": 8}, {"language_model": ["q_proj", "v_proj"]},
                  prefix_targets=("encoder", "decoder", "language_model")),
    "opt": Family("opt", "opt", "causal-lm", _LM_GROUPS, ("language_model",), {"language_model": 8}, _QV),
    "llama": Family("llama", "llama", "causal-lm", _LM_GROUPS, ("language_model",), {"language_model": 8}, _QV),
    "qwen2": Family("qwen2", "qwen2", "causal-lm", _LM_GROUPS, ("language_model",), {"language_model": 8}, _QV),
    "t5": Family("t5", "t5", "seq2seq-lm", _LM_GROUPS, ("language_model",), {"language_model": 8},
                 {"language_model": ["q", "v"]}, prefix_targets=("encoder", "decoder", "language_model")),
}
BY_MODEL_TYPE: dict[str, str] = {f.model_type: f.name for f in FAMILIES.values()}
# Every prefix target name any family takes: what prefix.lengths may name.
PREFIX_TARGETS: tuple[str, ...] = tuple(dict.fromkeys(t for f in FAMILIES.values() for t in f.prefix_targets))


def supported() -> str:
    """``blip-2 (blip2), opt, llama, qwen2, t5``: the checkpoint types a recipe trains."""
    return ", ".join(t if t == n else f"{t} ({n})" for t, n in BY_MODEL_TYPE.items())


def checkpoint_model_type(path: str | Path) -> str | None:
    """``model_type`` of ``path/config.json``; None when the directory or its config.json is missing (the
    checkpoint check names that problem). A config.json that is not JSON is a data error. A released Oscar/VinVL
    config (``bert`` or no model type, with ``img_feature_dim``) is ``vinvl``."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    try:
        raw = json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"model.path {config}: not valid JSON ({e}); re-save the checkpoint") from None
    if not isinstance(raw, dict):
        return None
    # a released Oscar / VinVL checkpoint says model_type bert (or, older, none) and carries the image feature size
    if raw.get("model_type") in ("bert", None) and "img_feature_dim" in raw:
        return "vinvl"
    return raw.get("model_type")


def family_of_checkpoint(path: str | Path) -> str | None:
    """The family of a checkpoint directory (RecipeError for a model type ptscale does not train)."""
    model_type = checkpoint_model_type(path)
    if model_type is None:
        return None
    if model_type not in BY_MODEL_TYPE:
        raise RecipeError(f"model.path {path}: a {model_type!r} checkpoint (config.json model_type); ptscale trains "
                          f"{supported()}")
    return BY_MODEL_TYPE[model_type]


def resolve_family(family: str | None, path: str | None, preset_family: str) -> str:
    """``model.family`` as given, else detected from ``model.path``, else the preset's. A family that
    contradicts the checkpoint is an error (the weights could not load into it)."""
    if family is not None and family not in FAMILIES:
        raise RecipeError(f"model.family: {family!r} is not supported; supported: {', '.join(FAMILIES)}")
    detected = family_of_checkpoint(path) if path else None
    if family is not None and detected is not None and family != detected:
        raise RecipeError(f"model.family={family}, but model.path {path} holds a {FAMILIES[detected].model_type} "
                          f"checkpoint; remove model.family (it is detected) or set it to {detected}")
    return family or detected or preset_family
