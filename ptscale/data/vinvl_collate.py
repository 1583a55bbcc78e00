"""Batches for VinVL (``ptscale.models.vinvl``), with the interface of :class:`ptscale.data.collate.CaptionCollator`.

A record's regions and tags (``ptscale.data.region_features``) come from ``data.region_features`` (files per image)
or, for the synthetic task without it, from its rendered scene; :meth:`VinVLCollator.preprocess` attaches them
(``region_features``, ``tags``) to in-memory records, and a batch of records without them reads them then.

* Training (Oscar+ captioning): ``input_ids`` = ``[CLS] caption [SEP]`` (at most ``max_caption_len`` tokens, padded
  right), a share ``mask_prob`` of its tokens after [CLS] (at least 1, at most ``max_masked_tokens``) picked and
  replaced as in BERT (80 % [MASK], 10 % a random word, 10 % unchanged); ``labels`` holds the original token there
  and -100 elsewhere. ``tag_ids`` = ``tags [SEP]``; ``region_features`` (B, R, img_feature_dim); masks for each.
* Generation: ``input_ids`` = ``[CLS]``, the same tags and regions; the model returns the new tokens only.

VinVL takes no prompt (Oscar+ captions from the image alone): ``data.prompt`` must stay empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ptscale.data.region_features import BOX_VALUES, read_regions, synthetic_regions
from ptscale.data.text_collate import IGNORE, pad_rows

MAX_TAGS = 30  # Oscar: max_seq_length 70 - max_seq_a_length 40 tokens for the tags
MAX_REGIONS = 50  # Oscar+/VinVL captioning: max_img_seq_length 50


@dataclass
class VinVLCollator:
    tokenizer: object
    config: object  # VinVLConfig: img_feature_dim, max_caption_len, mask_prob, max_masked_tokens
    region_features: str | None = None  # data.region_features; None: synthetic records make their own
    max_text_len: int = 32
    per_record_prompt = False  # no prompt at all: data sources drop records' own task prompts for this collator

    @property
    def max_caption_tokens(self) -> int:
        return min(self.max_text_len, self.config.max_caption_len - 2)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    # --- regions and tags ---------------------------------------------------------------------------------
    def regions(self, record: dict) -> tuple[np.ndarray, list[str]]:
        if "region_features" in record:
            return record["region_features"], record["tags"]
        if self.region_features is not None:
            return read_regions(self.region_features, str(record["image_id"]), self.config.img_feature_dim)
        if "scene" not in record:
            raise ValueError(f"record {record.get('image_id')!r}: no region features; set data.region_features to "
                             "the directory of its <image_id>.npy / .json files")
        return synthetic_regions(record["scene"], record["image"], self.config.img_feature_dim - BOX_VALUES)

    def check_regions(self, image_ids: list[str]) -> None:
        """Every image's files exist and hold the right layout (shapes, tags; values are checked when read):
        a data set's bad file stops the run before training (DataError, exit 3)."""
        if self.region_features is not None:
            for image_id in dict.fromkeys(image_ids):
                read_regions(self.region_features, image_id, self.config.img_feature_dim, header_only=True)

    def preprocess(self, records: list[dict]) -> list[dict]:
        """Attach ``region_features`` and ``tags`` to every record (read or made once; a bad file fails here)."""
        out = []
        for r in records:
            features, tags = self.regions(r)
            out.append({**r, "region_features": features, "tags": tags})
        return out

    def _context(self, records: list[dict]) -> dict[str, torch.Tensor]:
        feats, tag_rows = [], []
        for r in records:
            f, tags = self.regions(r)
            feats.append(torch.as_tensor(np.asarray(f, dtype=np.float32))[:MAX_REGIONS])
            tag_rows.append(self._ids(" ".join(tags))[:MAX_TAGS - 1] + [self.tokenizer.sep_token_id])
        tag_ids, tag_mask = pad_rows(tag_rows, self.tokenizer.pad_token_id)
        r = max(f.shape[0] for f in feats)
        region = torch.zeros(len(feats), r, feats[0].shape[1])
        region_mask = torch.zeros(len(feats), r, dtype=torch.long)
        for i, f in enumerate(feats):
            region[i, :f.shape[0]], region_mask[i, :f.shape[0]] = f, 1
        return {"tag_ids": tag_ids, "tag_mask": tag_mask, "region_features": region, "region_mask": region_mask}

    # --- batches --------------------------------------------------------------------------------------------
    def train_batch(self, records: list[dict], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``generator``: the masking's randomness (None: torch's global generator, seeded by the run)."""
        tok = self.tokenizer
        rows, labels = [], []
        for r in records:
            ids = [tok.cls_token_id] + self._ids(r["target"])[: self.max_caption_tokens] + [tok.sep_token_id]
            label = [IGNORE] * len(ids)
            candidates = len(ids) - 1  # never [CLS]
            n = min(max(round(self.config.mask_prob * len(ids)), 1), self.config.max_masked_tokens, candidates)
            for pos in (torch.randperm(candidates, generator=generator)[:n] + 1).tolist():
                label[pos] = ids[pos]
                draw = torch.rand((), generator=generator).item()
                if draw < 0.8:
                    ids[pos] = tok.mask_token_id
                elif draw < 0.9:
                    ids[pos] = int(torch.randint(len(tok), (), generator=generator))
            rows.append(ids)
            labels.append(label)
        input_ids, attention_mask = pad_rows(rows, tok.pad_token_id)
        label_t, _ = pad_rows(labels, IGNORE)
        return {"input_ids": input_ids, "attention_mask": attention_mask, **self._context(records), "labels": label_t,
                "image_keys": [str(r["image_id"]) for r in records]}

    def generation_batch(self, records: list[dict]) -> dict[str, torch.Tensor]:
        n = len(records)
        return {"input_ids": torch.full((n, 1), self.tokenizer.cls_token_id, dtype=torch.long),
                "attention_mask": torch.ones(n, 1, dtype=torch.long), **self._context(records)}

    def generated(self, ids: torch.Tensor, batch: dict) -> torch.Tensor:
        """VinVL's generate returns the new tokens only."""
        return ids


def vinvl_collator(source, data_cfg) -> VinVLCollator:
    """The collator for a VinVL backbone (or its BackboneSource) and a recipe's data section."""
    from ptscale.errors import RecipeError

    if data_cfg.prompt:
        raise RecipeError(f"data.prompt={data_cfg.prompt!r}: VinVL captions from the image alone (no prompt); "
                          "remove data.prompt")
    if data_cfg.name not in ("synthetic", "coco", "flickr30k"):
        raise RecipeError(f"data.name={data_cfg.name}: VinVL trains on caption data (synthetic, coco, flickr30k)")
    if data_cfg.name == "synthetic" and data_cfg.task != "downstream" and data_cfg.task != "pretrain":
        raise RecipeError(f"data.task={data_cfg.task}: VinVL is a captioner; use data.task: downstream or pretrain")
    if data_cfg.name != "synthetic" and not data_cfg.region_features:
        raise RecipeError(f"data.region_features: VinVL on {data_cfg.name} needs the images' region features; set it "
                          "to their directory (README 'Region features')")
    return VinVLCollator(source.tokenizer, source.config, region_features=data_cfg.region_features,
                         max_text_len=data_cfg.max_text_len)
