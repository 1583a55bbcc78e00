"""The unknown-token check: data the model's tokenizer cannot express stops the run at load time with the
rate and the fix; the embedded synthetic data has no unknown token at all."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ptscale.config import DataConfig, RecipeError
from ptscale.data.collate import CaptionCollator
from ptscale.data.sources import load_splits
from ptscale.data.synthetic import TASKS, vocabulary
from ptscale.data.vocabulary import (
    SAMPLE_TEXTS,
    UNKNOWN_TOKEN_LIMIT,
    check_vocabulary,
    split_texts,
    unknown_token_rate,
)
from ptscale.models.tokenizer import word_tokenizer
from tests.data.conftest import TinyImageProcessor, karpathy_record

ROOT = Path(__file__).resolve().parents[2]
# COCO-style captions (from the COCO 2014 val annotations of the two fixture images' kind of scene).
COCO_CAPTIONS = ["A man riding a bike down a city street.", "Two people standing next to a red bus.",
                 "A plate of food with broccoli and rice.", "A cat sleeping on a laptop keyboard.",
                 "A group of giraffes walking in a field."]


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """The default tiny model's tokenizer: word-level over the synthetic vocabulary, as pretrain builds it."""
    return word_tokenizer(vocabulary())


def _collator(tokenizer) -> CaptionCollator:
    return CaptionCollator(TinyImageProcessor(), tokenizer, num_query_tokens=2, image_token_id=4)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_synthetic_data_has_no_unknown_token(tiny_tokenizer, task: str) -> None:
    cfg = DataConfig(name="synthetic", task=task, train_size=200, eval_size=50)
    splits = load_splits(cfg, _collator(tiny_tokenizer))
    for split in (splits.train, splits.eval):
        kind, texts = split_texts(split)
        rate = unknown_token_rate(tiny_tokenizer, texts)
        assert kind == ("questions and answers" if task == "vqa" else "captions") and rate.tokens > 500
        assert rate.unknown == 0


def _coco_with_captions(coco: dict[str, Any], captions: list[str]) -> DataConfig:
    records = [karpathy_record(r["imgid"], r["filename"], r["split"], captions, filepath=r["filepath"],
                               cocoid=r["cocoid"]) for r in coco["records"]]
    coco["write"](records)
    return DataConfig(name="coco", karpathy_json=str(coco["json"]), image_root=str(coco["root"]),
                      train_split="train", eval_split="test", train_size=0, eval_size=0)


def test_coco_captions_on_the_tiny_tokenizer_are_refused(coco, tiny_tokenizer) -> None:
    cfg = _coco_with_captions(coco, COCO_CAPTIONS)
    with pytest.raises(RecipeError) as info:
        load_splits(cfg, _collator(tiny_tokenizer))
    message = str(info.value)
    assert message.startswith("data.name=coco: ")
    assert "% of tokens in the training captions are unknown to the model's tokenizer (<unk>)" in message
    assert "model.path=DIR" in message and "'A'" in message  # the fix, and an example of an unknown word
    rate = float(message.split(": ")[1].split("%")[0])
    assert 70 < rate < 100  # "a", "on", "the", "red", "and", "in" are in the synthetic vocabulary


def test_coco_karpathy_fixture_captions_are_refused(coco, tiny_tokenizer) -> None:
    """The shared Karpathy fixture as written ("caption k of image N"): only "image" (of the synthetic task
    prompt "describe the image") is a word the tiny model knows."""
    cfg = DataConfig(name="coco", karpathy_json=str(coco["json"]), image_root=str(coco["root"]),
                     train_split="train", eval_split="test")
    with pytest.raises(RecipeError, match=r"data.name=coco: 80.0% of tokens in the training captions"):
        load_splits(cfg, _collator(tiny_tokenizer))


def test_eval_split_is_measured_too(coco, tiny_tokenizer) -> None:
    records = [karpathy_record(r["imgid"], r["filename"], r["split"],
                               ["a red circle on the left"] if r["split"] != "test" else COCO_CAPTIONS,
                               filepath=r["filepath"], cocoid=r["cocoid"]) for r in coco["records"]]
    coco["write"](records)
    cfg = DataConfig(name="coco", karpathy_json=str(coco["json"]), image_root=str(coco["root"]),
                     train_split="train", eval_split="test")
    with pytest.raises(RecipeError, match="of tokens in the eval captions are unknown"):
        load_splits(cfg, _collator(tiny_tokenizer))


def test_covered_real_captions_load(coco, tiny_tokenizer) -> None:
    cfg = _coco_with_captions(coco, ["a red circle on the left", "the large square is on the top"])
    splits = load_splits(cfg, _collator(tiny_tokenizer))
    assert len(splits.train) > 0 and len(splits.eval) > 0


def test_the_cap_on_training_examples_limits_what_is_measured(coco, tiny_tokenizer) -> None:
    """Only the first ``train_size`` examples train; unknown words after them do not stop the run."""
    first_train = next(r for r in coco["records"] if r["split"] == "train")
    records = [karpathy_record(r["imgid"], r["filename"], r["split"],
                               ["a red circle on the left"] * 2 if r is first_train or r["split"] == "test"
                               else COCO_CAPTIONS, filepath=r["filepath"], cocoid=r["cocoid"])
               for r in coco["records"]]
    coco["write"](records)
    cfg = DataConfig(name="coco", karpathy_json=str(coco["json"]), image_root=str(coco["root"]),
                     train_split="train", eval_split="test", train_size=2)
    load_splits(cfg, _collator(tiny_tokenizer))
    with pytest.raises(RecipeError, match="training captions"):
        load_splits(replace(cfg, train_size=0), _collator(tiny_tokenizer))


def test_vqa_questions_on_the_tiny_tokenizer_are_refused(vqa, tiny_tokenizer) -> None:
    cfg = DataConfig(name="vqav2", vqa_train_questions=str(vqa["questions"]),
                     vqa_train_annotations=str(vqa["annotations"]), vqa_eval_questions=str(vqa["questions"]),
                     vqa_eval_annotations=str(vqa["annotations"]), image_root=str(vqa["root"]))
    with pytest.raises(RecipeError, match=r"data.name=vqav2: \d+\.\d% of tokens in the training questions and "
                                          "answers are unknown"):
        load_splits(cfg, _collator(tiny_tokenizer))


class CraftedTokenizer:
    """A slow (no offsets) word-level tokenizer over a given vocabulary; unknown words map to ``unk_token_id``."""

    unk_token, unk_token_id, is_fast = "[UNK]", 0, False

    def __init__(self, words: list[str]) -> None:
        self.vocab = {w: i + 1 for i, w in enumerate(words)}

    def __call__(self, texts: list[str], add_special_tokens: bool = False, return_offsets_mapping: bool = False):
        assert not add_special_tokens and not return_offsets_mapping
        return {"input_ids": [[self.vocab.get(w, 0) for w in t.split()] for t in texts]}


def _records(texts: list[str]) -> list[dict[str, Any]]:
    return [{"image_id": str(k), "captions": [t], "target": t} for k, t in enumerate(texts)]


def test_threshold_at_the_function_level() -> None:
    known = [f"w{k}" for k in range(19)]
    tokenizer = CraftedTokenizer(known)
    at_limit = _records([" ".join(known) + " zzz"])  # 1 unknown of 20 tokens: exactly 5%
    rates = check_vocabulary("coco", tokenizer, {"training": at_limit, "eval": at_limit})
    assert rates["training"].rate == pytest.approx(UNKNOWN_TOKEN_LIMIT) and rates["training"].examples == ()
    above = _records([" ".join(known[:18]) + " zzz yyy"])  # 2 of 20: 10%
    with pytest.raises(RecipeError) as info:
        check_vocabulary("flickr30k", tokenizer, {"training": at_limit, "eval": above})
    assert str(info.value).startswith("data.name=flickr30k: 10.0% of tokens in the eval captions are unknown "
                                      "to the model's tokenizer ([UNK]), measured on 1 texts (20 tokens)")


def test_sample_is_capped() -> None:
    texts = [f"t{k}" for k in range(SAMPLE_TEXTS + 500)]
    assert split_texts(_records(texts))[1] == texts[:SAMPLE_TEXTS]


def test_tokenizer_without_unknown_token_measures_zero() -> None:
    class ByteLevel:  # byte-level BPE: every string is known bytes, there is no unk token
        unk_token_id = None

        def __call__(self, *args, **kwargs):
            raise AssertionError("nothing to tokenize: the rate is 0 by construction")

    rate = unknown_token_rate(ByteLevel(), ["anything at all"])
    assert rate.rate == 0.0 and rate.texts == 1


def test_unknown_words_are_quoted(tiny_tokenizer) -> None:
    rate = unknown_token_rate(tiny_tokenizer, ["a zebra and a zebra", "the zebra on the giraffe"])
    assert rate.unknown == 4 and rate.tokens == 10
    assert rate.examples == ("zebra", "giraffe")


@pytest.mark.slow
def test_cli_run_on_uncovered_data_stops_with_exit_2(coco, tmp_path) -> None:
    """As a user runs it: ``launchers/train.py data.name=coco ...`` on the default tiny model."""
    cfg = _coco_with_captions(coco, COCO_CAPTIONS)
    proc = subprocess.run([sys.executable, "launchers/train.py", f"output_dir={tmp_path / 'runs'}", "data.name=coco",
                           f"data.karpathy_json={cfg.karpathy_json}", f"data.image_root={cfg.image_root}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "unknown to the model's tokenizer" in line]
    assert len(lines) == 1 and lines[0].startswith("ptscale: error: data.name=coco: ")
    assert "model.path=DIR" in lines[0]
