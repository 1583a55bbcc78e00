"""``ptscale export`` on a saved run: trained weights, PEFT-format LoRA that PEFT loads, merged model."""

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import Blip2ForConditionalGeneration

from ptscale.cli import main
from ptscale.runs import load_run
from tests.runs_fixture import tiny_runs  # noqa: F401


def test_export_all_formats(tiny_runs, tmp_path):  # noqa: F811
    run_dir = tiny_runs.a
    assert main(["export", str(run_dir), "--trainable", str(tmp_path / "t.safetensors"),
                 "--peft", str(tmp_path / "peft"), "--merged", str(tmp_path / "merged")]) == 0
    weights = load_file(tmp_path / "t.safetensors")
    assert any(".lora_B." in k for k in weights) and any(k.startswith("prefixes.") for k in weights)
    run = load_run(run_dir)
    ids = torch.tensor([[run.backbone.image_token_id] * run.backbone.num_query_tokens + [2, 7, 8]])
    batch = {"pixel_values": torch.randn(1, 3, 32, 32), "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad(), run.model.prefixes_disabled():
        ours = run.model(**batch).logits
    base = Blip2ForConditionalGeneration.from_pretrained(run.backbone.path)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    with torch.no_grad():
        theirs = peft_model(**batch).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    merged = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, ours, rtol=1e-4, atol=1e-4)
    assert (tmp_path / "merged" / "prefixes.safetensors").is_file()
