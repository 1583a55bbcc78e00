"""VinVL by recipe on 2 ranks under ZeRO-3: captioning prefix -> LoRA on the embedded tiny VinVL (prefixes in BERT's
self-attention through the attention-interface hook, with the Oscar mask), each stage changing exactly its groups,
CIDEr on the synthetic downstream task after training above before."""

import json

import pytest

from tests.launch import BIN, changed_groups, last_program_line, launch

VINVL = ["model.preset=tiny-vinvl", "plan=prefix->lora", "prefix.lengths={bert: 8}",
         "lora.targets={bert: [attention.self.query, attention.self.value]}"]


@pytest.mark.slow
def test_vinvl_captioning_prefix_then_lora_two_ranks_zero3(tmp_path):
    out = launch([str(BIN / "deepspeed"), "--num_gpus", "2", "launchers/train.py", "--ds", "ds_configs/zero3.json",
                  f"output_dir={tmp_path}", "run_name=vinvl", *VINVL, "methods.prefix.evaluate=false",
                  # the masked-token loss sees ~3 caption tokens per caption and step: the default budget does not
                  # learn the new caption style; 8 LoRA epochs at 3e-3 do
                  "methods.lora.epochs=8", "methods.lora.lr=3.0e-3", "checkpoint.every_steps=0"], timeout=1800)
    run = tmp_path / "vinvl"
    assert last_program_line(out) == f"run directory: {run}"
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2
    points = {e["point"]: e["metrics"] for e in results["evaluations"]}
    assert list(points) == ["before training", "prefix+lora"]
    assert points["prefix+lora"]["CIDEr"] > points["before training"]["CIDEr"]
    assert changed_groups(run / "stage-1-prefix") == {"prefix"}
    assert changed_groups(run / "stage-2-prefix+lora") == {"prefix", "lora"}
