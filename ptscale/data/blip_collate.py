"""Batches for BLIP (``ptscale.models.blip``), with the interface of :class:`ptscale.data.collate.CaptionCollator`.

BOS is the text config's ``bos_token_id`` (BLIP's ``[DEC]``), SEP its ``sep_token_id``.

* Captioning (``BlipForConditionalGeneration``): the decoder reads ``[BOS] prompt caption [SEP]``, loss on the
  caption and its SEP. BLIP's ``generate`` drops the last input column and overwrites the first with BOS, so a
  generation batch is ``[BOS] prompt [SEP]``, with one prompt (``data.prompt``) for the whole batch.
* VQA (``BlipForQuestionAnswering``): the question (the record's own, without ``data.prompt``'s template,
  tokenised with the tokenizer's special tokens: ``[CLS] question [SEP]`` for BLIP's BERT tokenizer) goes to the
  text encoder; the answer decoder reads ``[BOS] answer [SEP]`` (``decoder_input_ids``), loss on the answer and
  its SEP. ``generate`` answers from ``[BOS]`` and returns it first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptscale.data.images import ImageRecords
from ptscale.data.text_collate import IGNORE, pad_rows


@dataclass
class BlipCaptionCollator(ImageRecords):
    image_processor: object
    tokenizer: object
    bos: int
    sep: int
    pad: int
    prompt: str = ""
    max_text_len: int = 32
    # one prompt per batch (data.prompt): data sources drop records' own task prompts for this collator
    per_record_prompt = False

    def _head(self, record: dict) -> list[int]:
        if "prompt" in record:
            raise ValueError("BLIP captioning takes one prompt for the whole batch (data.prompt), not one per "
                             "record; VQA records need a BLIP VQA backbone")
        return [self.bos] + self._ids(self.prompt)

    def train_batch(self, records: list[dict]) -> dict[str, torch.Tensor]:
        """Right-padded; labels -100 on BOS, the prompt and padding."""
        rows, labels = [], []
        for r in records:
            head = self._head(r)
            cap = self._ids(r["target"])[: self.max_text_len] + [self.sep]
            rows.append(head + cap)
            labels.append([IGNORE] * len(head) + cap)
        input_ids, attention_mask = pad_rows(rows, self.pad)
        label_t, _ = pad_rows(labels, IGNORE)
        return {"pixel_values": self.pixels(records), "input_ids": input_ids, "attention_mask": attention_mask,
                "labels": label_t, "image_keys": [str(r["image_id"]) for r in records]}

    def generation_batch(self, records: list[dict]) -> dict[str, torch.Tensor]:
        """``[BOS] prompt [SEP]`` per row (BLIP's generate drops the SEP column and continues after the prompt)."""
        heads = [self._head(r) + [self.sep] for r in records]
        return {"pixel_values": self.pixels(records), "input_ids": torch.tensor(heads),
                "attention_mask": torch.ones(len(heads), len(heads[0]), dtype=torch.long)}

    def generated(self, ids: torch.Tensor, batch: dict) -> torch.Tensor:
        """The new tokens of ``generate``'s output, which starts with ``[BOS] prompt`` (the input less its SEP)."""
        return ids[:, batch["input_ids"].shape[1] - 1:]


@dataclass
class BlipVQACollator(BlipCaptionCollator):
    """VQA batches for ``BlipForQuestionAnswering`` (see the module docstring)."""

    def _question(self, record: dict) -> list[int]:
        if "question" not in record:
            raise ValueError(f"record {record.get('image_id')!r} has no question: a BLIP VQA backbone trains on VQA "
                             "data (data.name: vqav2)")
        return self.tokenizer(record["question"])["input_ids"][: self.max_text_len]

    def train_batch(self, records: list[dict]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_rows([self._question(r) for r in records], self.pad)
        answers = [[self.bos] + self._ids(r["target"])[: self.max_text_len] + [self.sep] for r in records]
        decoder_ids, decoder_mask = pad_rows(answers, self.pad)
        labels = decoder_ids.masked_fill(decoder_mask == 0, IGNORE)
        labels[:, 0] = IGNORE  # BOS is given, never predicted
        return {"pixel_values": self.pixels(records), "input_ids": input_ids, "attention_mask": attention_mask,
                "decoder_input_ids": decoder_ids, "decoder_attention_mask": decoder_mask, "labels": labels,
                "image_keys": [str(r["image_id"]) for r in records]}

    def generation_batch(self, records: list[dict]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_rows([self._question(r) for r in records], self.pad)
        return {"pixel_values": self.pixels(records), "input_ids": input_ids, "attention_mask": attention_mask}

    def generated(self, ids: torch.Tensor, batch: dict) -> torch.Tensor:
        return ids[:, 1:]  # the answer decoder starts from [BOS]


def blip_collator(source, data_cfg) -> BlipCaptionCollator:
    """The collator for a BLIP backbone (or its BackboneSource) and a recipe's data section: captioning or VQA by
    the checkpoint's architecture."""
    from ptscale.errors import RecipeError

    text = source.config.text_config
    vqa = (source.config.architectures or [""])[0] == "BlipForQuestionAnswering"
    if vqa != (data_cfg.name == "vqav2"):
        model = "a BLIP VQA backbone (BlipForQuestionAnswering)" if vqa else "a BLIP captioning backbone"
        raise RecipeError(f"data.name={data_cfg.name} with {model}: BLIP VQA checkpoints train on VQAv2 data "
                          "(data.name: vqav2), captioning checkpoints on caption data")
    cls = BlipVQACollator if vqa else BlipCaptionCollator
    return cls(source.image_processor, source.tokenizer, text.bos_token_id, text.sep_token_id, text.pad_token_id,
               prompt=data_cfg.prompt, max_text_len=data_cfg.max_text_len)
