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
