"""Batches for language models: prompt then completion, loss on the completion only (the usual SFT
convention), or plain text with the loss on every token.

A record is ``{"id", "prompt", "completion"}`` or ``{"id", "text"}`` (``ptscale.data.text`` reads them). The
prompt and the completion are tokenized separately (the completion is not re-tokenized together with the
prompt, so its tokens are the same in training and in scoring): put a leading space in the completion if the
tokenizer needs one. Decoder-only models get ``[BOS] prompt completion EOS`` (BOS where the tokenizer has one);
an encoder-decoder model (T5) reads ``prompt EOS`` and predicts ``completion EOS``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

IGNORE = -100  # the label of a token outside the loss (cross_entropy's ignore_index), for every collator


@dataclass
class TextCollator:
    tokenizer: object
    max_text_len: int
    seq2seq: bool = False
    chat_template: bool = False  # wrap prompts in the tokenizer's chat template (a user turn)
    pad_token_id: int = 0

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _prompt(self, record: dict) -> list[int]:
        prompt = record.get("prompt", "")
        if self.chat_template and "completion" in record:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
            return self._ids(text)  # the template writes its own special tokens
        bos = self.tokenizer.bos_token_id
        head = [bos] if bos is not None and not self.seq2seq else []
        return head + self._ids(prompt) + ([self.tokenizer.eos_token_id] if self.seq2seq and prompt else [])

    def _target(self, record: dict) -> list[int]:
        return self._ids(record["completion"] if "completion" in record else record["text"]) + \
            [self.tokenizer.eos_token_id]

    def encode(self, record: dict) -> tuple[list[int], list[int]]:
        """(prompt tokens, target tokens): the loss is on the target."""
        return self._prompt(record), self._target(record)

    def length(self, record: dict) -> int:
        prompt, target = self.encode(record)
        return len(prompt) + len(target)

    def train_batch(self, records: list[dict]) -> dict[str, torch.Tensor]:
        """Right-padded; labels -100 on the prompt and the padding."""
        pairs = [self.encode(r) for r in records]
        if self.seq2seq:
            inputs = [p or [self.tokenizer.eos_token_id] for p, _ in pairs]
            ids, mask = self._pad(inputs, left=False)
            labels, _ = self._pad([t for _, t in pairs], left=False, value=IGNORE)
            return {"input_ids": ids, "attention_mask": mask, "labels": labels}
        ids, mask = self._pad([p + t for p, t in pairs], left=False)
        labels, _ = self._pad([[IGNORE] * len(p) + t for p, t in pairs], left=False, value=IGNORE)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def generation_batch(self, records: list[dict]) -> dict[str, torch.Tensor]:
        """The prompts, left-padded for a decoder-only model (it continues from every row's last position)."""
        prompts = [self._prompt(r) or [self.tokenizer.eos_token_id] for r in records]
        ids, mask = self._pad(prompts, left=not self.seq2seq)
        return {"input_ids": ids, "attention_mask": mask}

    def _pad(self, rows: list[list[int]], *, left: bool, value: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_rows(rows, self.pad_token_id if value is None else value, left=left)


def pad_rows(rows: list[list[int]], value: int, *, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows padded with ``value`` to the longest (on the left for a decoder-only model's generation prompts),
    and their attention mask: every collator pads through here."""
    width = max(map(len, rows))
    padded = [[value] * (width - len(r)) + r if left else r + [value] * (width - len(r)) for r in rows]
    mask = [[0] * (width - len(r)) + [1] * len(r) if left else [1] * len(r) + [0] * (width - len(r)) for r in rows]
    return torch.tensor(padded), torch.tensor(mask)


def make_text_collator(tokenizer, data_cfg, *, seq2seq: bool) -> TextCollator:
    """The collator for a language model's tokenizer and a recipe's data section. A tokenizer without a pad token
    (Llama's, Qwen2's) pads with EOS: padding is masked and never in the loss, so any id serves; said once."""
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
        log.warning("the tokenizer has no pad token: padding with its EOS token (id %d; masked, never in the loss)",
                    pad)
    chat = data_cfg.chat_template == "auto" and bool(getattr(tokenizer, "chat_template", None))
    if chat:
        log.info("prompts are wrapped in the tokenizer's chat template (data.chat_template: never to turn it off)")
    return TextCollator(tokenizer, data_cfg.max_text_len, seq2seq=seq2seq, chat_template=chat, pad_token_id=pad)
