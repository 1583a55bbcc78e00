"""BLIP captioning by recipe on 2 ranks under ZeRO-3: prefix -> LoRA on the embedded tiny BLIP (prefixes in the
text decoder's self-attention through the module wrappers), each stage changing exactly its groups, CIDEr after
training above before; and a local BLIP checkpoint (``model.path``) built under zero.Init."""

import json

import pytest

from tests.launch import BIN, changed_groups, last_program_line, launch

BLIP = ["model.preset=tiny-blip", "plan=prefix->lora", "prefix.lengths={decoder: 8}",
        "lora.targets={text_decoder: [attention.self.query, attention.self.value]}"]


@pytest.mark.slow
def test_blip_captioning_prefix_then_lora_two_ranks_zero3(tmp_path):
    out = launch([str(BIN / "deepspeed"), "--num_gpus", "2", "launchers/train.py", "--ds", "ds_configs/zero3.json",
                  f"output_dir={tmp_path}", "run_name=blip", *BLIP, "methods.prefix.evaluate=false",
                  "checkpoint.every_steps=0"], timeout=1800)
    run = tmp_path / "blip"
    assert last_program_line(out) == f"run directory: {run}"
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2
    points = {e["point"]: e["metrics"] for e in results["evaluations"]}
    assert list(points) == ["before training", "prefix+lora"]
    assert points["prefix+lora"]["CIDEr"] > points["before training"]["CIDEr"]
    assert changed_groups(run / "stage-1-prefix") == {"prefix"}
    assert changed_groups(run / "stage-2-prefix+lora") == {"prefix", "lora"}


@pytest.mark.slow
def test_blip_checkpoint_under_zero3_full_fine_tuning(tmp_path):
    """``model.path`` (a tiny save_pretrained BLIP captioning directory) is loaded into ZeRO-3 partitions; the
    prefix stage moves the prefixes only, the full stage the vision tower and the text decoder (not the word
    embeddings or the prediction head)."""
    from ptscale.models.blip import new_tiny_blip, tiny_processor

    path = tmp_path / "blip-ckpt"
    model, tokenizer = new_tiny_blip("tiny-blip", seed=0)
    for thing in (model, tokenizer, tiny_processor("tiny-blip")):
        thing.save_pretrained(path)
    steps = "{steps: 2, lr: 1.0e-3, evaluate: false}"
    launch([str(BIN / "deepspeed"), "--num_gpus", "2", "launchers/train.py", "--ds", "ds_configs/zero3.json",
            f"output_dir={tmp_path}", "run_name=full", f"model.path={path}", "plan=prefix->full",
            "prefix.lengths={decoder: 4, vision: 2}", f"methods.prefix={steps}", f"methods.full={steps}",
            "eval.before_training=false", "data.train_size=128", "checkpoint.every_steps=0"], timeout=900)
    run = tmp_path / "full"
    assert changed_groups(run / "stage-1-prefix") == {"prefix"}
    assert changed_groups(run / "stage-2-prefix+full") == {"prefix", "vision", "text_decoder"}
