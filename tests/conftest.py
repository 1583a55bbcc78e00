import os

# Triton picks interpreter or compiler when it is first imported (and when a kernel is decorated). The kernel
# tests run the kernels on CPU through the interpreter, but any test module collected before tests/kernels may
# import Triton first (transformers -> torch._dynamo -> triton). So Triton and the kernels are imported here,
# before any test module, under TRITON_INTERPRET=1; the variable is then restored (tests/kernels/conftest.py
# sets it around its own tests and checks that the interpreter took effect).
_previous_interpret = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
import ptscale_kernels.triton_prefix_attention  # noqa: E402, F401
import ptscale_kernels.triton_prefix_plus  # noqa: E402, F401
import triton.language.standard  # noqa: E402, F401

if _previous_interpret is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _previous_interpret

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (the README's `-n 2`) each worker's launches share the cores with the other workers': a
# process started by a test (a run, a rank) takes its share of threads instead of all the cores, which would
# oversubscribe them (torch's OpenMP threads spin, and oversubscribed they slow every process down).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))


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
