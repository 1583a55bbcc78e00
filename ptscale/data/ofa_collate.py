"""Batches for OFA (``ptscale.models.ofa``), with the interface of :class:`ptscale.data.collate.CaptionCollator`.

OFA reads an instruction and the image in its encoder and writes the answer with its decoder (Wang et al., 2022,
the captioning and VQA fine-tuning tasks):

* encoder: ``<s> instruction </s>`` after the image cells. The instruction is, for a question, the question
  itself (OFA's VQA prompt; ``data.prompt`` with ``{}`` replaces it), for a caption the record's own task prompt
  (the synthetic world's) or ``data.prompt`` or OFA's " what does the image describe?";
* decoder: ``<s> target`` (teacher forcing), labels ``target </s>``; BPE text starts with a space, as in OFA.

Texts are normalised as OFA's data is: questions lower-cased, ending in ``?``; caption targets lower-cased without
punctuation (``ofa_question``, ``ofa_caption``). OFA's released VQA fine-tuning reads the question in the decoder
too (``prompt_type=prev_output``) and picks answers from a candidate list; here the answer is generated from
``<s>`` (its ``prompt_type=none``, the pre-training framing) and scored with the official accuracy.

``generate`` starts from ``<s>`` and returns it first.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

import torch

from ptscale.data.images import ImageRecords
from ptscale.data.text_collate import IGNORE, pad_rows

CAPTION_PROMPT = " what does the image describe?"  # OFA's captioning instruction
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def ofa_question(question: str) -> str:
    """A question as OFA's VQA data has it: lower case, leading punctuation stripped, ``-`` and ``/`` as spaces, one
    space between words, ending in ``?``."""
    text = question.strip().lower().lstrip(",.!?*#:;~").replace("-", " ").replace("/", " ")
    text = re.sub(r"\s{2,}", " ", text).strip()
    return text if text.endswith("?") else text + "?"


def ofa_caption(caption: str) -> str:
    """A caption target as OFA's captioning data has it: lower case, no punctuation, one space between words."""
    return " ".join(caption.lower().translate(_PUNCTUATION).split())


@dataclass
class OFACollator(ImageRecords):
    image_processor: object
    tokenizer: object
    prompt: str = ""
    max_text_len: int = 32
    per_record_prompt = True  # a caption record's own task prompt is its instruction

    def _text(self, text: str) -> list[int]:
        """BPE ids of `` text`` (OFA's texts start with a space; a word-level vocabulary ignores it)."""
        return self._ids(" " + text.strip())

    def instruction(self, record: dict) -> str:
        if "question" in record:
            question = ofa_question(record["question"])
            return self.prompt.format(question) if self.prompt else question
        return record.get("prompt") or self.prompt or CAPTION_PROMPT

    def _source(self, record: dict) -> list[int]:
        tok = self.tokenizer
        return [tok.bos_token_id] + self._text(self.instruction(record))[: self.max_text_len] + [tok.eos_token_id]

    def _encoder(self, records: list[dict]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_rows([self._source(r) for r in records], self.tokenizer.pad_token_id)
        return {"pixel_values": self.pixels(records), "input_ids": input_ids, "attention_mask": attention_mask}

    def train_batch(self, records: list[dict]) -> dict[str, torch.Tensor]:
        """Right-padded; labels -100 on padding."""
        tok = self.tokenizer
        targets = [self._text(r["target"] if "question" in r else ofa_caption(r["target"]))[: self.max_text_len]
                   for r in records]
        decoder_ids, decoder_mask = pad_rows([[tok.bos_token_id] + t for t in targets], tok.pad_token_id)
        labels, _ = pad_rows([t + [tok.eos_token_id] for t in targets], IGNORE)
        return {**self._encoder(records), "decoder_input_ids": decoder_ids, "decoder_attention_mask": decoder_mask,
                "labels": labels, "image_keys": [str(r["image_id"]) for r in records]}

    def generation_batch(self, records: list[dict]) -> dict[str, torch.Tensor]:
        return self._encoder(records)

    def generated(self, ids: torch.Tensor, batch: dict) -> torch.Tensor:
        return ids[:, 1:]  # the decoder starts from <s>


def ofa_collator(source, data_cfg) -> OFACollator:
    """The collator for an OFA backbone (or its BackboneSource) and a recipe's data section."""
    return OFACollator(source.image_processor, source.tokenizer, prompt=data_cfg.prompt,
                       max_text_len=data_cfg.max_text_len)
