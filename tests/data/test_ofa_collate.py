"""OFA's batches (ptscale.data.ofa_collate): the instruction in the encoder, teacher forcing in the decoder."""

import pytest

from ptscale.data.ofa_collate import CAPTION_PROMPT, OFACollator, ofa_caption, ofa_question
from ptscale.data.synthetic import make_split
from ptscale.data.text_collate import IGNORE
from ptscale.models.ofa import image_processor, new_tiny_ofa


@pytest.fixture(scope="module")
def parts():
    model, tokenizer = new_tiny_ofa("tiny-ofa")
    return tokenizer, image_processor(model.config.image_resolution)


def _collator(parts, prompt=""):
    tokenizer, processor = parts
    return OFACollator(processor, tokenizer, prompt=prompt, max_text_len=40)


def test_caption_batch_reads_instruction_and_teacher_forces_the_caption(parts):
    tok = parts[0]
    records = make_split("downstream", 3, 0, "train")
    batch = _collator(parts).train_batch(records)
    assert batch["pixel_values"].shape == (3, 3, 48, 48)
    for i, r in enumerate(records):
        source = batch["input_ids"][i][batch["attention_mask"][i] == 1].tolist()
        assert source[0] == tok.bos_token_id and source[-1] == tok.eos_token_id
        assert tok.decode(source[1:-1]) == " " + r["prompt"]  # the record's own task prompt is its instruction
        labels = batch["labels"][i][batch["labels"][i] != IGNORE].tolist()
        assert tok.decode(labels[:-1]) == " " + r["target"] and labels[-1] == tok.eos_token_id
        # the decoder reads <s> and the caption: the labels shifted right by one
        decoder = batch["decoder_input_ids"][i][: len(labels)].tolist()
        assert decoder == [tok.bos_token_id] + labels[:-1]
        assert batch["decoder_attention_mask"][i].sum() == len(labels)


def test_instruction_rules(parts):
    plain = _collator(parts)
    assert plain.instruction({"target": "x"}) == CAPTION_PROMPT  # a caption without a prompt: OFA's
    assert plain.instruction({"prompt": "list the objects", "target": "x"}) == "list the objects"
    question = {"question": "what color is the circle?", "prompt": "Question: what color is the circle? Answer:"}
    assert plain.instruction(question) == "what color is the circle?"  # OFA's VQA prompt is the question itself
    assert _collator(parts, "Q: {} A:").instruction(question) == "Q: what color is the circle? A:"
    assert _collator(parts, " describe").instruction({"target": "x"}) == " describe"


def test_vqa_batch_and_generation(parts):
    tok = parts[0]
    records = make_split("vqa", 2, 0, "train")
    collate = _collator(parts)
    batch = collate.train_batch(records)
    for i, r in enumerate(records):
        source = batch["input_ids"][i][batch["attention_mask"][i] == 1].tolist()
        assert tok.decode(source[1:-1]) == " " + ofa_question(r["question"])
    gen = collate.generation_batch(records)
    assert set(gen) == {"pixel_values", "input_ids", "attention_mask"}
    assert (gen["input_ids"] == batch["input_ids"]).all()
    ids = gen["input_ids"][:, :3]
    assert (collate.generated(ids, gen) == ids[:, 1:]).all()  # generate's output starts with <s>


def test_texts_are_normalised_as_ofas_data_is():
    assert ofa_question("What color is the dog-house/shed") == "what color is the dog house shed?"
    assert ofa_question(" ...How  many?") == "how many?"
    assert ofa_caption("A man, riding a Bike.") == "a man riding a bike"
    collate = OFACollator(None, None)
    assert collate.instruction({"question": "Is it RED"}) == "is it red?"
