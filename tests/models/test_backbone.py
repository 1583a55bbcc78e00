import json
import threading
import time

import pytest
import torch

from ptscale.config import ModelConfig
from ptscale.models.backbone import (
    MARKER,
    default_backbone_dir,
    ensure_default_backbone,
    is_complete,
    load_backbone,
)


def test_model_path_loads_a_saved_hf_checkpoint(tmp_path, tiny_backbone):
    model, tok, proc = tiny_backbone
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    bb = load_backbone(tmp_path)
    assert bb.num_query_tokens == model.config.num_query_tokens
    assert bb.tokenizer("a red circle", add_special_tokens=False)["input_ids"] == \
        tok("a red circle", add_special_tokens=False)["input_ids"]
    for (n, a), (_, b) in zip(model.state_dict().items(), bb.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


def test_model_path_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_backbone(tmp_path)


def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("PTSCALE_CACHE", str(tmp_path))
    cfg = ModelConfig(pretrain_steps=2)
    built = []
    import ptscale.models.pretrain as pretrain

    real = pretrain.pretrain_default
    monkeypatch.setattr(pretrain, "pretrain_default", lambda *a: built.append(a) or real(*a))
    path = ensure_default_backbone(cfg)
    assert path == default_backbone_dir(cfg) and is_complete(path) and len(built) == 1
    assert ensure_default_backbone(cfg) == path and len(built) == 1  # reused, not rebuilt
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # torn file
    assert not is_complete(path)
    ensure_default_backbone(cfg)
    assert is_complete(path) and len(built) == 2
    assert json.loads((path / MARKER).read_text())["steps"] == 2
    load_backbone(path)


def test_concurrent_first_runs_build_the_backbone_once(tmp_path, monkeypatch):
    """Two runs started together on a fresh machine (a grid, parallel tests): one builds, the other waits for the
    lock and reuses the result; neither replaces the directory while the other reads it."""
    monkeypatch.setenv("PTSCALE_CACHE", str(tmp_path))
    cfg = ModelConfig(pretrain_steps=2)
    built = []
    import ptscale.models.pretrain as pretrain

    real = pretrain.pretrain_default

    def slow_pretrain(*a):
        built.append(a)
        time.sleep(1.0)  # long enough for the second caller to reach the lock while the first one builds
        return real(*a)

    monkeypatch.setattr(pretrain, "pretrain_default", slow_pretrain)
    paths, errors = [], []

    def first_run():
        try:
            paths.append(ensure_default_backbone(cfg))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=first_run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(built) == 1
    assert paths == [default_backbone_dir(cfg)] * 2 and is_complete(paths[0])
