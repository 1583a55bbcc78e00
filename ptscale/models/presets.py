"""Named BLIP-2 geometries. ``tiny-blip2-opt`` is the embedded default (CPU-trainable in minutes);
``blip2-opt-2.7b`` is the exact geometry of Salesforce/blip2-opt-2.7b (random weights without a
checkpoint); ``blip2-opt-6.7b`` that of Salesforce/blip2-opt-6.7b (memory planning, random weights)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # preset names are checked with the recipe, before transformers is imported
    from transformers import Blip2Config

PRESETS: dict[str, dict] = {
    "tiny-blip2-opt": {
        # 48 px images in 8 px patches: 37 vision tokens; 32 query tokens; captions of up to ~30 words. Each
        # tower's last-layer features of one sample thus have tens of singular values (the effective rank of
        # paper table 1 can separate methods), while a run still trains in a minute or two on a CPU.
        "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "image_size": 48, "patch_size": 8},
        "qformer_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "encoder_hidden_size": 64, "max_position_embeddings": 64,
                           "attention_probs_dropout_prob": 0.0, "hidden_dropout_prob": 0.0},
        "text_config": {"model_type": "opt", "hidden_size": 128, "ffn_dim": 256, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "max_position_embeddings": 128, "word_embed_proj_dim": 128,
                        "dropout": 0.0, "attention_dropout": 0.0},
        "num_query_tokens": 32,
    },
    "blip2-opt-2.7b": {
        "vision_config": {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39,
                          "num_attention_heads": 16, "image_size": 224, "patch_size": 14},
        "qformer_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                           "num_attention_heads": 12, "encoder_hidden_size": 1408, "vocab_size": 30522},
        "text_config": {"model_type": "opt", "hidden_size": 2560, "ffn_dim": 10240, "num_hidden_layers": 32,
                        "num_attention_heads": 32, "max_position_embeddings": 2048, "word_embed_proj_dim": 2560,
                        "vocab_size": 50304},
        "num_query_tokens": 32,
    },
    # Salesforce/blip2-opt-6.7b: the same ViT-g and Q-Former, OPT-6.7B as the language model.
    "blip2-opt-6.7b": {
        "vision_config": {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39,
                          "num_attention_heads": 16, "image_size": 224, "patch_size": 14},
        "qformer_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                           "num_attention_heads": 12, "encoder_hidden_size": 1408, "vocab_size": 30522},
        "text_config": {"model_type": "opt", "hidden_size": 4096, "ffn_dim": 16384, "num_hidden_layers": 32,
                        "num_attention_heads": 32, "max_position_embeddings": 2048, "word_embed_proj_dim": 4096,
                        "vocab_size": 50304},
        "num_query_tokens": 32,
    },
}


# BLIP (ptscale.models.blip): the tiny captioning default, pre-trained once and cached like tiny-blip2-opt.
BLIP_PRESETS: dict[str, dict] = {
    "tiny-blip": {
        "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "image_size": 32, "patch_size": 8, "attention_dropout": 0.0},
        "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "encoder_hidden_size": 64, "max_position_embeddings": 64, "hidden_dropout_prob": 0.0,
                        "attention_probs_dropout_prob": 0.0},
    },
}


# VinVL (ptscale.models.vinvl): the tiny captioning default over synthetic region features (64 appearance values + 6
# box values per region), pre-trained once and cached like the others. VinVLConfig keys; the vocabulary and special
# tokens come from the tokenizer.
VINVL_PRESETS: dict[str, dict] = {
    "tiny-vinvl": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "max_position_embeddings": 128, "type_vocab_size": 2, "hidden_dropout_prob": 0.0,
                   "attention_probs_dropout_prob": 0.0, "img_feature_dim": 70, "max_caption_len": 40,
                   "mask_prob": 0.15, "max_masked_tokens": 3},
}


# OFA (ptscale.models.ofa): the tiny default, pre-trained once and cached like the others. OFAConfig keys, plus
# the size of its byte-level BPE (trained on the synthetic words); codes and bins follow it, as in OFA's vocabulary.
# 48 px images: the ResNet's stride 16 gives 3 x 3 cells, one per cell of the synthetic scenes' grid.
OFA_PRESETS: dict[str, dict] = {
    "tiny-ofa": {"d_model": 64, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
                 "decoder_attention_heads": 4, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128,
                 "resnet_layers": [1, 1, 1], "image_resolution": 48, "max_position_embeddings": 128,
                 "token_bucket_size": 32, "image_bucket_size": 8, "dropout": 0.0, "num_codes": 64, "num_bins": 32,
                 "bpe_vocab_size": 600},
}


# Language-model presets (LlamaConfig keys; the vocabulary and special tokens come from the tokenizer).
# tiny-llama-text is the text embedded default: grouped-query attention (4 query heads, 2 KV heads) and RoPE.
TEXT_PRESETS: dict[str, dict] = {
    "tiny-llama-text": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
                        "rope_theta": 10000.0, "tie_word_embeddings": False},
}

# Presets with an embedded pre-training recipe (ptscale.models.pretrain, ptscale.models.blip): without model.path
# they are pre-trained once and cached. The others are geometries: random weights without a checkpoint.
PRETRAINABLE: tuple[str, ...] = ("tiny-blip2-opt", "tiny-llama-text", *BLIP_PRESETS, *VINVL_PRESETS, *OFA_PRESETS)


ALL_PRESETS: tuple[str, ...] = (*PRESETS, *BLIP_PRESETS, *VINVL_PRESETS, *OFA_PRESETS, *TEXT_PRESETS)


def check_preset(preset: str, where: str) -> None:
    """``where``: how the user named it (``model.preset``, ``--model``)."""
    from ptscale.errors import RecipeError

    if preset not in ALL_PRESETS:
        raise RecipeError(f"{where}: unknown preset {preset!r}; known: {', '.join(ALL_PRESETS)} (`ptscale ls presets`)")


def preset_spec(preset: str) -> dict:
    """A preset's geometry: BLIP-2, BLIP, VinVL, OFA or language model."""
    check_preset(preset, "model.preset")
    return {**PRESETS, **BLIP_PRESETS, **VINVL_PRESETS, **OFA_PRESETS, **TEXT_PRESETS}[preset]


def preset_family(preset: str) -> str:
    """The model family of a preset (ptscale.models.families)."""
    if preset in TEXT_PRESETS:
        return TEXT_PRESETS[preset]["model_type"]
    if preset in VINVL_PRESETS:
        return "vinvl"
    if preset in OFA_PRESETS:
        return "ofa"
    return "blip" if preset in BLIP_PRESETS else "blip2"


def uses_random_weights(model_cfg) -> bool:
    """No checkpoint and no embedded pre-training (a geometry preset, or ``pretrain_steps: 0``)."""
    return model_cfg.path is None and (model_cfg.preset not in PRETRAINABLE or model_cfg.pretrain_steps == 0)


def blip2_config(preset: str, *, vocab_size: int | None = None, pad: int = 1, bos: int = 2, eos: int = 2,
                 image_token: int | None = None) -> Blip2Config:
    from transformers import Blip2Config

    if preset not in PRESETS:
        raise ValueError(f"model.preset: unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    spec = {k: dict(v) if isinstance(v, dict) else v for k, v in PRESETS[preset].items()}
    text = spec["text_config"]
    if vocab_size is not None:
        text["vocab_size"] = vocab_size
        spec["qformer_config"].setdefault("vocab_size", vocab_size)
    text.update(pad_token_id=pad, bos_token_id=bos, eos_token_id=eos)
    if image_token is not None:
        spec["image_token_index"] = image_token
    return Blip2Config(**spec)


def preset_parts(preset: str) -> tuple[Blip2Config, object, object]:
    """A geometry preset's config, the synthetic word tokenizer and an image processor at its resolution: what
    a random-weights build needs (no weights). The preset's vocabulary (50304 for OPT) is larger than the
    tokenizer's, which only leaves rows unused."""
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from ptscale.data.synthetic import vocabulary
    from ptscale.models.tokenizer import word_tokenizer

    tokenizer = word_tokenizer(vocabulary())
    cfg = blip2_config(preset, pad=tokenizer.pad_token_id, bos=tokenizer.bos_token_id,
                       eos=tokenizer.eos_token_id, image_token=tokenizer.convert_tokens_to_ids("<image>"))
    if cfg.text_config.vocab_size < len(tokenizer):
        raise ValueError(f"preset {preset}: vocabulary {cfg.text_config.vocab_size} is smaller than the synthetic "
                         f"tokenizer's {len(tokenizer)}")
    size = cfg.vision_config.image_size
    return cfg, tokenizer, BlipImageProcessorPil(size={"height": size, "width": size})
