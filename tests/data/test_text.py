"""Text data through datasets: every file kind, the columns named in the recipe, the bad-data policy, and the
batches (loss on the completion only)."""

import dataclasses
import json

import datasets
import pytest

from ptscale.config import DataConfig
from ptscale.data.bad_data import BadDataError, EmptySplitError
from ptscale.data.text import load_text_split
from ptscale.data.text_collate import IGNORE, TextCollator, make_text_collator
from ptscale.errors import DataError
from ptscale.models.tokenizer import word_tokenizer
from tests.text_fixtures import WORDS, reverse_records, write_jsonl

TOK = word_tokenizer(WORDS)


def _cfg(train, evals=None, **kw):
    return DataConfig(name="text", train_file=str(train), eval_file=str(evals or train), max_text_len=32, **kw)


def _collator(cfg):
    return make_text_collator(TOK, cfg, seq2seq=False)


def _load(cfg, which="train"):
    return load_text_split(cfg, _collator(cfg), which)


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet", "saved"])
def test_every_file_kind_reads_the_same_records(tmp_path, kind):
    rows = reverse_records(5, 0)
    table = datasets.Dataset.from_list(rows)
    if kind == "jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", rows)
    elif kind == "csv":
        table.to_csv(path := tmp_path / "d.csv", index=False)
    elif kind == "parquet":
        table.to_parquet(path := tmp_path / "d.parquet")
    else:
        datasets.DatasetDict({"train": table, "test": table.select(range(2))}).save_to_disk(path := tmp_path / "saved")
    cfg = _cfg(path, None if kind == "saved" else path)
    records, report = _load(cfg)
    assert [(r["prompt"], r["completion"]) for r in records] == [(r["prompt"], r["completion"]) for r in rows]
    assert report.counts == {}
    assert len(_load(cfg, "eval")[0]) == (2 if kind == "saved" else 5)


def test_plain_text_and_named_columns(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"body": "w1 w2 w3"}) + "\n")
    assert _load(_cfg(path, text_column="body"))[0][0] == {"id": "0", "text": "w1 w2 w3"}
    two = tmp_path / "qa.jsonl"
    two.write_text(json.dumps({"q": "copy w1", "a": "w1"}) + "\n")
    assert _load(_cfg(two, prompt_column="q", completion_column="a"))[0] == [
        {"id": "0", "prompt": "copy w1", "completion": "w1"}]


@pytest.mark.parametrize("content,error,needles", [
    ('{"prompt": "a",\n', DataError, ["data.train_file", "cannot be read as json"]),
    ('{"question": "a", "answer": "b"}\n', DataError, ["no column 'completion'", "columns: question, answer",
                                                        "data.text_column"]),
    ('{"completion": "w1"}\n', DataError, ["no prompt column 'prompt'"]),
    ("", EmptySplitError, ["holds no records"]),
])
def test_unreadable_files_and_missing_columns_name_the_file(tmp_path, content, error, needles):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(error) as e:
        _load(_cfg(path))
    for needle in needles + ([str(path)] if error is DataError else []):
        assert needle in str(e.value)


def test_saved_dataset_without_the_split(tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_list(reverse_records(2, 0))}).save_to_disk(tmp_path / "s")
    with pytest.raises(DataError, match="has no split 'test' .*its splits: train.*data.eval_split"):
        _load(dataclasses.replace(_cfg(tmp_path / "s"), eval_file=None), "eval")


def test_bad_records_error_naming_file_and_record_or_skip_and_count(tmp_path):
    rows = reverse_records(4, 0)
    rows[1]["completion"] = "  "
    rows[3]["completion"] = " ".join(["w1"] * 40)  # > max_text_len tokens
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(BadDataError, match=rf"text is empty: {path} .*record 1"):
        _load(_cfg(path))
    records, report = _load(_cfg(path, on_bad_data="skip"))
    assert [r["id"] for r in records] == ["0", "2"]
    assert report.counts == {"empty_text": 1, "too_long": 1} and report.kept == 2
    rows = [dict(r, completion="") for r in rows]
    with pytest.raises(EmptySplitError, match="every record was bad"):
        _load(_cfg(write_jsonl(tmp_path / "e.jsonl", rows), on_bad_data="skip"))


def test_train_size_caps_after_skipping(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", reverse_records(10, 0))
    assert len(_load(dataclasses.replace(_cfg(path), train_size=3))[0]) == 3


def test_batches_put_the_loss_on_the_completion_only():
    c = TextCollator(TOK, 32, pad_token_id=TOK.pad_token_id)
    records = [{"id": "0", "prompt": "reverse w1 w2 ->", "completion": "w2 w1"},
               {"id": "1", "prompt": "copy w3 ->", "completion": "w3"}]
    batch = c.train_batch(records)
    bos, eos = TOK.bos_token_id, TOK.eos_token_id
    first = [bos, *TOK("reverse w1 w2 ->", add_special_tokens=False)["input_ids"]]
    answer = [*TOK("w2 w1", add_special_tokens=False)["input_ids"], eos]
    assert batch["input_ids"][0].tolist() == first + answer
    assert batch["labels"][0].tolist() == [IGNORE] * len(first) + answer
    row = batch["labels"][1].tolist()  # right padding: outside the loss
    assert row[-1] == IGNORE and batch["attention_mask"][1].tolist()[-1] == 0
    gen = c.generation_batch(records)  # left padding: every prompt ends at the last column
    assert gen["attention_mask"][1].tolist()[0] == 0
    assert gen["input_ids"][1, -1].item() == TOK.convert_tokens_to_ids("->")
    plain = c.train_batch([{"id": "0", "text": "w1 w2"}])
    assert plain["labels"][0].tolist() == [IGNORE] + plain["input_ids"][0].tolist()[1:]  # all but BOS


def test_chat_template_wraps_the_prompt_where_the_tokenizer_has_one(caplog):
    tok = word_tokenizer(WORDS + ["USER:", "ASSISTANT:"])
    tok.chat_template = "{% for m in messages %}USER: {{ m['content'] }} {% endfor %}ASSISTANT:"
    cfg = DataConfig(name="text", max_text_len=32)
    c = make_text_collator(tok, cfg, seq2seq=False)
    assert c.chat_template
    prompt, _ = c.encode({"prompt": "copy w1", "completion": "w1"})
    assert tok.decode(prompt) == "USER: copy w1 ASSISTANT:"
    assert not make_text_collator(tok, dataclasses.replace(cfg, chat_template="never"), seq2seq=False).chat_template
