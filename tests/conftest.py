import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def tiny_backbone():
    """A fresh (untrained) tiny BLIP-2 with its word tokenizer and image processor."""
    from ptscale.models.pretrain import new_tiny_model, tiny_processor

    model, tokenizer = new_tiny_model("tiny-blip2-opt", seed=0)
    return model.eval(), tokenizer, tiny_processor()


@pytest.fixture(scope="session")
def blip2_dir(tmp_path_factory):
    """A tiny BLIP-2 checkpoint directory for ``model.path`` (weights, tokenizer, image processor): command-line
    tests run on it without pre-training the default backbone. Tests that change weights copy it first."""
    from ptscale.models.pretrain import new_tiny_model, tiny_processor

    path = tmp_path_factory.mktemp("blip2")
    model, tok = new_tiny_model("tiny-blip2-opt", seed=0)
    for thing in (model, tok, tiny_processor()):
        thing.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def lm_dirs(tmp_path_factory):
    """family -> a tiny standalone language-model checkpoint directory (OPT; Llama with GQA), with its tokenizer."""
    from tests.text_fixtures import save_lm

    root = tmp_path_factory.mktemp("lms")
    return {family: save_lm(family, root / family) for family in ("opt", "llama")}


@pytest.fixture(scope="session")
def text_data(tmp_path_factory):
    """(train.jsonl, eval.jsonl): prompt / completion records of a short-answer task."""
    from tests.text_fixtures import reverse_records, write_jsonl

    root = tmp_path_factory.mktemp("text")
    return (write_jsonl(root / "train.jsonl", reverse_records(64, 0)),
            write_jsonl(root / "eval.jsonl", reverse_records(16, 1)))


# Fixtures that train whole runs in subprocesses (tests/runs_fixture.py): every test using them is end-to-end, so it
# belongs to the full suite (the README's command), not to the `-m "not slow"` inner loop.
_END_TO_END_FIXTURES = {"tiny_runs", "analysed_runs"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _END_TO_END_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
