"""BLIP's captioning batches: [BOS] prompt caption [SEP], loss on the caption and its SEP, right padding; the
generation batch [BOS] prompt [SEP] (BLIP's generate drops the last column); one prompt per batch."""

import pytest

from ptscale.data.blip_collate import IGNORE, BlipCaptionCollator
from ptscale.data.synthetic import vocabulary
from ptscale.models.tokenizer import word_tokenizer

BOS, SEP, PAD = 30, 31, 1


def _collator(prompt=""):
    tok = word_tokenizer(vocabulary())
    return BlipCaptionCollator(image_processor=None, tokenizer=tok, bos=BOS, sep=SEP, pad=PAD, prompt=prompt,
                               max_text_len=3), tok


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_train_batch_layout_and_labels():
    collator, tok = _collator("a")
    records = [{"image_id": 1, "pixel_values": None, "target": "red circle"},
               {"image_id": 2, "pixel_values": None, "target": "the large blue square on the left"}]
    collator.pixels = lambda rs: None  # no images needed for the text layout
    batch = collator.train_batch(records)
    a = _ids(tok, "a")
    long = _ids(tok, "the large blue")  # cut at max_text_len, before its SEP
    assert batch["input_ids"].tolist() == [[BOS, *a, *_ids(tok, "red circle"), SEP, PAD],
                                           [BOS, *a, *long, SEP]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1] * 6]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, *_ids(tok, "red circle"), SEP, IGNORE],
                                        [IGNORE, IGNORE, *long, SEP]]
    assert batch["image_keys"] == ["1", "2"]


def test_generation_batch_and_new_tokens():
    import torch

    collator, tok = _collator("a")
    collator.pixels = lambda rs: None
    batch = collator.generation_batch([{"image_id": 1}, {"image_id": 2}])
    a = _ids(tok, "a")
    assert batch["input_ids"].tolist() == [[BOS, *a, SEP]] * 2 and batch["attention_mask"].tolist() == [[1, 1, 1]] * 2
    out = torch.tensor([[BOS, *a, 7, 8], [BOS, *a, 9, SEP]])  # what BLIP's generate returns: [BOS] prompt, new
    assert collator.generated(out, batch).tolist() == [[7, 8], [9, SEP]]


def test_a_prompt_per_record_is_refused():
    collator, _ = _collator()
    with pytest.raises(ValueError, match="one prompt for the whole batch"):
        collator.generation_batch([{"image_id": 1, "prompt": "what colour?"}])
