"""Batches for captioning: image tokens, BOS, prompt, caption, EOS; loss on the caption only."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptscale.data.images import ImageRecords
from ptscale.data.text_collate import IGNORE, make_text_collator, pad_rows

__all__ = ["IGNORE", "CaptionCollator", "make_collator"]


@dataclass
class CaptionCollator(ImageRecords):
    image_processor: object
    tokenizer: object
    num_query_tokens: int
    image_token_id: int
    prompt: str = ""
    max_text_len: int = 32
    per_record_prompt = True  # a record's own "prompt" (a VQA question, a synthetic task prompt) replaces data.prompt

    def _head(self, record: dict) -> list[int]:
        """Image tokens, BOS, then the record's own prompt (VQA questions) or the collator's."""
        prompt = record.get("prompt", self.prompt)
        return [self.image_token_id] * self.num_query_tokens + [self.tokenizer.bos_token_id] + self._ids(prompt)

    def train_batch(self, records: list[dict]) -> dict[str, torch.Tensor]:
        """Right-padded teacher-forcing batch; labels are -100 outside the caption."""
        rows, labels = [], []
        for r in records:
            head = self._head(r)
            sep = " " if r.get("prompt", self.prompt) else ""
            cap = self._ids(sep + r["target"])[: self.max_text_len] + [self.tokenizer.eos_token_id]
            rows.append(head + cap)
            labels.append([IGNORE] * len(head) + cap)
        input_ids, attention_mask = pad_rows(rows, self.tokenizer.pad_token_id)
        label_t, _ = pad_rows(labels, IGNORE)
        return {"pixel_values": self.pixels(records), "input_ids": input_ids,
                "attention_mask": attention_mask, "labels": label_t,
                "image_keys": [str(r["image_id"]) for r in records]}  # for the frozen-tower feature cache

    def generation_batch(self, records: list[dict]) -> dict[str, torch.Tensor]:
        """Left-padded heads (a decoder-only LM continues from the last position of every row)."""
        input_ids, attention_mask = pad_rows([self._head(r) for r in records], self.tokenizer.pad_token_id, left=True)
        return {"pixel_values": self.pixels(records), "input_ids": input_ids, "attention_mask": attention_mask}

    def generated(self, ids: torch.Tensor, batch: dict) -> torch.Tensor:
        """The new tokens of ``generate``'s output (which repeats the prompt first)."""
        return ids[:, batch["input_ids"].shape[1]:]


def make_collator(model_parts, data_cfg):
    """The collator for a backbone (or its BackboneSource: tokenizer, image processor, query tokens, image
    token id) and a recipe's data section: the one place it is built. A language model (its ``kind``) gets a
    :class:`ptscale.data.text_collate.TextCollator`; BLIP (family ``blip``) ``ptscale.data.blip_collate``'s;
    VinVL ``ptscale.data.vinvl_collate``'s; OFA ``ptscale.data.ofa_collate``'s."""
    if getattr(model_parts, "family", "blip2") == "ofa":
        from ptscale.data.ofa_collate import ofa_collator

        return ofa_collator(model_parts, data_cfg)
    if getattr(model_parts, "family", "blip2") == "vinvl":
        from ptscale.data.vinvl_collate import vinvl_collator

        return vinvl_collator(model_parts, data_cfg)
    if getattr(model_parts, "family", "blip2") == "blip":
        from ptscale.data.blip_collate import blip_collator

        return blip_collator(model_parts, data_cfg)
    kind = getattr(model_parts, "kind", "vision-language")
    if kind != "vision-language":
        return make_text_collator(model_parts.tokenizer, data_cfg, seq2seq=kind == "seq2seq-lm")
    return CaptionCollator(model_parts.image_processor, model_parts.tokenizer, model_parts.num_query_tokens,
                           model_parts.image_token_id, prompt=data_cfg.prompt, max_text_len=data_cfg.max_text_len)
