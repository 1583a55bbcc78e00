"""BLIP (Li et al., 2022), the PT-PEFT paper's other BLIP-family model: captioning
(``BlipForConditionalGeneration``) and VQA (``BlipForQuestionAnswering``) backbones, their tiny embedded
default (the pre-training; ``ptscale.models.backbone`` caches it and loads checkpoints) and its classes.

BLIP's attention does not dispatch through transformers' attention interface, so its prefixes go in through
module wrappers (``ptscale.prefix.wrapper``): the text decoder's self-attention (target ``decoder``), the text
encoder's (``encoder``, VQA only) and the vision tower's (``vision``).

* ``tiny-blip`` (captioning) is pre-trained once on the broad synthetic distribution, like the BLIP-2 default
  (``ptscale.models.pretrain``), and cached content-addressed beside it by ``ptscale.models.backbone``
  (``~/.cache/ptscale/backbones`` or ``$PTSCALE_CACHE``): a ``save_pretrained`` directory with the tokenizer and
  image processor.
* ``model.path`` may name a local copy of ``Salesforce/blip-image-captioning-base`` or ``blip-vqa-base``
  (``config.json`` with model type ``blip``, weights, tokenizer, image processor): captioning on caption data,
  VQA on VQAv2-format data (``data.name: vqav2``).
* Batches: ``ptscale.data.blip_collate``.
"""

from __future__ import annotations

import logging

import torch

from ptscale.data.blip_collate import BlipCaptionCollator
from ptscale.models.presets import BLIP_PRESETS

log = logging.getLogger(__name__)

MODEL_TYPE = "blip"
# architectures[0] of a BLIP checkpoint -> the task ptscale trains it on
ARCHITECTURES = {"BlipForConditionalGeneration": "captioning", "BlipForQuestionAnswering": "vqa"}

SEED = 20240601
BATCH = 64
LR = 2e-3


# --- configs and models ---------------------------------------------------------------------------------------
def blip_config(preset: str, tokenizer):
    """The preset's BlipConfig over ``tokenizer``'s vocabulary: BOS (decoder start) = its bos, SEP = its eos."""
    from transformers import BlipConfig

    if preset not in BLIP_PRESETS:
        raise ValueError(f"model.preset: unknown BLIP preset {preset!r}; known: {', '.join(BLIP_PRESETS)}")
    spec = {k: dict(v) for k, v in BLIP_PRESETS[preset].items()}
    spec["text_config"].update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                               sep_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id)
    return BlipConfig(**spec)


def model_class(task: str):
    from transformers import BlipForConditionalGeneration, BlipForQuestionAnswering

    return BlipForConditionalGeneration if task == "captioning" else BlipForQuestionAnswering


def new_tiny_blip(preset: str, task: str = "captioning", seed: int = SEED):
    from ptscale.data.synthetic import vocabulary
    from ptscale.models.tokenizer import word_tokenizer

    tokenizer = word_tokenizer(vocabulary())
    torch.manual_seed(seed)
    return model_class(task)(blip_config(preset, tokenizer)), tokenizer


def tiny_processor(preset: str):
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    size = BLIP_PRESETS[preset]["vision_config"]["image_size"]
    return BlipImageProcessorPil(size={"height": size, "width": size})


# --- the embedded default: pre-trained once, cached ---------------------------------------------------------
def pretrain_tiny_blip(preset: str, steps: int):
    """All parameters train on the broad synthetic distribution (plain PyTorch, one process), as for BLIP-2."""
    from ptscale.data.synthetic import make_split
    from ptscale.models.pretrain_loop import pretrain_steps

    model, tokenizer = new_tiny_blip(preset)
    processor = tiny_processor(preset)
    text = model.config.text_config
    collate = BlipCaptionCollator(processor, tokenizer, text.bos_token_id, text.sep_token_id, text.pad_token_id)
    # the broad captions without their task prompt: BLIP captioning takes one prompt per batch
    records = collate.preprocess([{k: v for k, v in r.items() if k != "prompt"}
                                  for r in make_split("pretrain", 4096, SEED, "pretrain")])

    def next_batch(rng):
        batch = collate.train_batch([records[i] for i in rng.sample(range(len(records)), BATCH)])
        batch.pop("image_keys")
        return batch

    pretrain_steps(model, next_batch, steps, LR, SEED, "pre-training BLIP backbone")
    return model.eval(), tokenizer, processor


# --- checkpoints ------------------------------------------------------------------------------------------------
def blip_task(config) -> str:
    """'captioning' or 'vqa' from a BLIP config's ``architectures``; ValueError for anything else."""
    arch = (getattr(config, "architectures", None) or [None])[0]
    if arch not in ARCHITECTURES:
        raise ValueError(f"a BLIP checkpoint of architecture {arch!r}; ptscale trains {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch]
