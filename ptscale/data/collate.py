"""Batches for captioning: image tokens, BOS, prompt, caption, EOS; loss on the caption only."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptscale.data.text_collate import IGNORE, make_text_collator

__all__ = ["IGNORE", "CaptionCollator", "make_collator"]


@dataclass
class CaptionCollator:
    image_processor: object
    tokenizer: object
    num_query_tokens: int
    image_token_id: int
    prompt: str = ""
    max_text_len: int = 32
    per_record_prompt = True  # a record's own "prompt" (a VQA question, a synthetic task prompt) replaces data.prompt

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _head(self, record: dict) -> list[int]:
        """Image tokens, BOS, then the record's own prompt (VQA questions) or the collator's."""
        prompt = record.get("prompt", self.prompt)
        return [self.image_token_id] * self.num_query_tokens + [self.tokenizer.bos_token_id] + self._ids(prompt)

    def pixels(self, records: list[dict]) -> torch.Tensor:
        """Processed images; records may carry ``pixel_values`` already (processed once, reused)."""
        if all("pixel_values" in r for r in records):
            return torch.stack([r["pixel_values"] for r in records])
        return self.image_processor([r["image"] for r in records], return_tensors="pt")["pixel_values"]

    def preprocess(self, records: list[dict]) -> list[dict]:
        """Attach ``pixel_values`` to every record (for datasets small enough to hold in memory)."""
        pixels = self.image_processor([r["image"] for r in records], return_tensors="pt")["pixel_values"]
        return [{**r, "pixel_values": px} for r, px in zip(records, pixels, strict=True)]

    def train_batch(self, records: list[dict]) -> dict[str, torch.Tensor]:
        """Right-padded teacher-forcing batch; labels are -100 outside the caption."""
        rows, labels = [], []
        for r in records:
            head = self._head(r)
            sep = " " if r.get("prompt", self.prompt) else ""
            cap = self._ids(sep + r["target"])[: self.max_text_len] + [self.tokenizer.eos_token_id]
            rows.append(head + cap)
            labels.append([IGNORE] * len(head) + cap)
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        label_t = torch.tensor([x + [IGNORE] * (width - len(x)) for x in labels])
        return {"pixel_values": self.pixels(records), "input_ids": input_ids,
                "attention_mask": attention_mask, "labels": label_t,
                "image_keys": [str(r["image_id"]) for r in records]}  # for the frozen-tower feature cache

    def generation_batch(self, records: list[dict]) -> dict[str, torch.Tensor]:
        """Left-padded heads (a decoder-only LM continues from the last position of every row)."""
        heads = [self._head(r) for r in records]
        width = max(map(len, heads))
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(h)) + h for h in heads])
        attention_mask = torch.tensor([[0] * (width - len(h)) + [1] * len(h) for h in heads])
        return {"pixel_values": self.pixels(records), "input_ids": input_ids, "attention_mask": attention_mask}

    def generated(self, ids: torch.Tensor, batch: dict) -> torch.Tensor:
        """The new tokens of ``generate``'s output (which repeats the prompt first)."""
        return ids[:, batch["input_ids"].shape[1]:]


def make_collator(model_parts, data_cfg):
    """The collator for a backbone (or its BackboneSource: tokenizer, image processor, query tokens, image
    token id) and a recipe's data section: the one place it is built. A language model (its ``kind``) gets a
    :class:`ptscale.data.text_collate.TextCollator`; BLIP (family ``blip``) ``ptscale.data.blip_collate``'s."""
    if getattr(model_parts, "family", "blip2") == "blip":
        from ptscale.data.blip_collate import blip_collator

        return blip_collator(model_parts, data_cfg)
    kind = getattr(model_parts, "kind", "vision-language")
    if kind != "vision-language":
        return make_text_collator(model_parts.tokenizer, data_cfg, seq2seq=kind == "seq2seq-lm")
    return CaptionCollator(model_parts.image_processor, model_parts.tokenizer, model_parts.num_query_tokens,
                           model_parts.image_token_id, prompt=data_cfg.prompt, max_text_len=data_cfg.max_text_len)
