"""QLoRA-style: a 4-bit (nf4) base, packed in the model dtype, sharded by ZeRO-3 over 2 ranks; prefix then
prefix+LoRA with LoRA on the quantised OPT q/v projections. Then the LoRA export against the
full-precision base loads in PEFT."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import Blip2ForConditionalGeneration

from ptscale.cli import main
from ptscale.runs import load_run
from tests.launch import BIN, changed_groups, launch

pytest.importorskip("bitsandbytes")


@pytest.mark.slow
def test_nf4_base_under_zero3_trains_prefix_then_lora_and_exports(tmp_path):
    out = launch([str(BIN / "deepspeed"), "--num_gpus", "2", "launchers/train.py", "--ds", "ds_configs/zero3.json",
                   f"output_dir={tmp_path}", "run_name=q", "model.quantization=nf4",
                   "lora.targets={qformer: [attention.attention.query], language_model: [q_proj, v_proj]}",
                   "eval.before_training=false", "eval.num_beams=1", "data.train_size=64", "data.eval_size=8",
                   "checkpoint.every_steps=0", "methods.prefix={steps: 2, lr: 5.0e-3, evaluate: false}",
                   "methods.lora={steps: 2, lr: 1.0e-3}"], timeout=900)
    run = tmp_path / "q"
    stages = sorted(run.glob("stage-*"), key=lambda d: int(d.name.split("-")[1]))
    assert [changed_groups(d) for d in stages] == [{"prefix"}, {"prefix", "lora"}]
    digests = json.loads((stages[1] / "param_digests.json").read_text())["before"]
    assert any(n.endswith("q_proj.base_layer.weight") for n in digests)  # the 4-bit weights were hashed too
    # trainable share over logical (unpacked) sizes: the same total as the full-precision model
    total = json.loads((run / "results.json").read_text())["evaluations"][-1]["total"]
    full = load_run(run, full_precision=True)
    assert total == sum(p.numel() for p in full.model.parameters())
    assert "[prefix+lora] trains prefix, lora" in out

    assert main(["export", str(run), "--peft", str(tmp_path / "peft")]) == 0
    lora = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert any("q_proj.lora_B" in k for k in lora)
    base = Blip2ForConditionalGeneration.from_pretrained(full.backbone.path)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    ids = torch.tensor([[full.backbone.image_token_id] * full.backbone.num_query_tokens + [2, 7, 8]])
    batch = {"pixel_values": torch.randn(1, 3, 32, 32), "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad(), full.model.prefixes_disabled():
        torch.testing.assert_close(peft_model(**batch).logits, full.model(**batch).logits, rtol=1e-5, atol=1e-5)
