"""Captioning batches for BLIP (``ptscale.models.blip``): ``[BOS] prompt caption [SEP]``, loss on the caption and
its SEP. BOS is the text config's ``bos_token_id`` (BLIP's ``[DEC]``), SEP its ``sep_token_id``. BLIP's
``generate`` drops the last input column and overwrites the first with BOS, so a generation batch is
``[BOS] prompt [SEP]``, with one prompt (``data.prompt``) for the whole batch. The same interface as
:class:`ptscale.data.collate.CaptionCollator`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass
class BlipCaptionCollator:
    image_processor: object
    tokenizer: object
    bos: int
    sep: int
    pad: int
    prompt: str = ""
    max_text_len: int = 32

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _head(self, record: dict) -> list[int]:
        if "prompt" in record:
            raise ValueError("BLIP captioning takes one prompt for the whole batch (data.prompt), not one per "
                             "record; VQA records need a BLIP VQA backbone")
        return [self.bos] + self._ids(self.prompt)

    def pixels(self, records: list[dict]) -> torch.Tensor:
        if all("pixel_values" in r for r in records):
            return torch.stack([r["pixel_values"] for r in records])
        return self.image_processor([r["image"] for r in records], return_tensors="pt")["pixel_values"]

    def preprocess(self, records: list[dict]) -> list[dict]:
        pixels = self.image_processor([r["image"] for r in records], return_tensors="pt")["pixel_values"]
        return [{**r, "pixel_values": px} for r, px in zip(records, pixels, strict=True)]

    def train_batch(self, records: list[dict]) -> dict[str, torch.Tensor]:
        """Right-padded; labels -100 on BOS, the prompt and padding."""
        rows, labels = [], []
        for r in records:
            head = self._head(r)
            cap = self._ids(r["target"])[: self.max_text_len] + [self.sep]
            rows.append(head + cap)
            labels.append([IGNORE] * len(head) + cap)
        width = max(map(len, rows))
        input_ids = torch.tensor([r + [self.pad] * (width - len(r)) for r in rows])
        attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        label_t = torch.tensor([x + [IGNORE] * (width - len(x)) for x in labels])
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


def blip_collator(source, data_cfg) -> BlipCaptionCollator:
    """The collator for a BLIP captioning backbone (or its BackboneSource) and a recipe's data section."""
    text = source.config.text_config
    return BlipCaptionCollator(source.image_processor, source.tokenizer, text.bos_token_id, text.sep_token_id,
                               text.pad_token_id, prompt=data_cfg.prompt, max_text_len=data_cfg.max_text_len)
