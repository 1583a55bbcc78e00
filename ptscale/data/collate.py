"""Batches for captioning: image tokens, BOS, prompt, caption, EOS; loss on the caption only."""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass
class CaptionCollator:
    image_processor: object
    tokenizer: object
    num_query_tokens: int
    image_token_id: int
    prompt: str = ""
    max_text_len: int = 32

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _head(self) -> list[int]:
        return [self.image_token_id] * self.num_query_tokens + [self.tokenizer.bos_token_id] + self._ids(self.prompt)

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
        head = self._head()
        rows, labels = [], []
        sep = " " if self.prompt else ""
        for r in records:
            cap = self._ids(sep + r["target"])[: self.max_text_len] + [self.tokenizer.eos_token_id]
            rows.append(head + cap)
            labels.append([IGNORE] * len(head) + cap)
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        label_t = torch.tensor([x + [IGNORE] * (width - len(x)) for x in labels])
        return {"pixel_values": self.pixels(records), "input_ids": input_ids,
                "attention_mask": attention_mask, "labels": label_t}

    def generation_batch(self, records: list[dict]) -> dict[str, torch.Tensor]:
        """The same head for every image (one prompt), so no padding is needed."""
        head = torch.tensor([self._head()] * len(records))
        return {"pixel_values": self.pixels(records), "input_ids": head, "attention_mask": torch.ones_like(head)}
