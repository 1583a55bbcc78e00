"""``ptscale export`` on a saved default run (prefix -> prefix+lora): every format, loaded the documented way,
reproduces the run; what does not reproduce it alone says so; bad input is one line and exit 2.

Logits: <= 1e-5 (fp32; a merged LoRA weight is W + BA rounded once, the folded prefix skips the encoder's
recomputation). Captions (greedy and beam token ids): exactly equal.
"""

import json

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import Blip2ForConditionalGeneration

import ptscale
from ptscale.cli import main
from ptscale.models.backbone import backbone_digest
from ptscale.runs import load_run
from tests.runs_fixture import tiny_runs  # noqa: F401

TOL = dict(rtol=1e-5, atol=1e-5)


def _batch(run, n=4):
    """Query-token placeholders + the run's prompt, random images: the captioning input shape."""
    g = torch.Generator().manual_seed(0)
    q = run.backbone.num_query_tokens
    prompt = run.backbone.tokenizer(run.cfg.data.prompt)["input_ids"]
    ids = torch.tensor([[run.backbone.image_token_id] * q + prompt] * n)
    return {"pixel_values": torch.randn(n, 3, 32, 32, generator=g), "input_ids": ids,
            "attention_mask": torch.ones_like(ids)}


def _same(a, b, batch):
    with torch.no_grad():
        torch.testing.assert_close(a(**batch).logits, b(**batch).logits, **TOL)
        for beams in (1, 3):
            kw = dict(max_new_tokens=12, num_beams=beams, do_sample=False)
            assert torch.equal(a.generate(**batch, **kw), b.generate(**batch, **kw)), f"num_beams={beams}"


def test_export_all_formats_round_trip(tiny_runs, tmp_path, capsys):  # noqa: F811
    run_dir = tiny_runs.a
    assert main(["export", str(run_dir), "--trainable", str(tmp_path / "t.safetensors"),
                 "--peft", str(tmp_path / "peft"), "--merged", str(tmp_path / "merged"),
                 "--peft-prefix", str(tmp_path / "peft_prefix")]) == 0
    printed = capsys.readouterr().out
    run = load_run(run_dir)
    batch = _batch(run)

    # --merged: ptscale.from_pretrained reproduces the run; the transformers folder alone is base + LoRA
    _same(ptscale.from_pretrained(tmp_path / "merged"), run.model, batch)
    plain = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "merged" / "without_prefixes").eval()
    with torch.no_grad(), run.model.prefixes_disabled():
        torch.testing.assert_close(plain(**batch).logits, run.model(**batch).logits, **TOL)
        assert (plain(**batch).logits - run.model(**batch).logits).abs().max() <= 1e-5
    with torch.no_grad():
        assert (plain(**batch).logits - run.model(**batch).logits).abs().max() > 1e-3  # the prefixes matter

    # --peft: LoRA attached by ptscale together with the prefixes; PEFT alone loads the LoRA exactly
    _same(ptscale.from_pretrained(tmp_path / "peft"), run.model, batch)
    adapter = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(run.backbone.path)
    peft_model = PeftModel.from_pretrained(Blip2ForConditionalGeneration.from_pretrained(run.backbone.path),
                                           tmp_path / "peft").eval()
    with torch.no_grad(), run.model.prefixes_disabled():
        torch.testing.assert_close(peft_model(**batch).logits, run.model(**batch).logits, **TOL)

    # --trainable: the checkpoint's trained tensors, by name
    weights = load_file(tmp_path / "t.safetensors")
    params = dict(run.model.named_parameters())
    assert any(".lora_B." in k for k in weights) and any(k.startswith("prefixes.") for k in weights)
    assert all(torch.equal(v, params[k].detach()) for k, v in weights.items())
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        assert f.metadata()["base_sha256"] == backbone_digest(run.backbone.path)

    # every manifest records the base and its digest; what is not the trained model alone is printed loudly
    for name in ("merged", "peft", "peft_prefix"):
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        assert manifest["base"]["name_or_path"] == str(run.backbone.path)
        assert manifest["base"]["sha256"] == backbone_digest(run.backbone.path)
        assert manifest["source"]["checkpoint"] == run.checkpoint.name
    peft_prefix = json.loads((tmp_path / "peft_prefix" / "manifest.json").read_text())
    assert any("qformer" in x and "no PEFT counterpart" in x for x in peft_prefix["not_included"])
    assert any("LoRA" in x for x in peft_prefix["not_included"])
    assert printed.count("WARNING: ") == 3  # merged folder alone, PEFT LoRA alone, PEFT prefix alone
    assert "reproduces the trained model with ptscale.from_pretrained: yes" in printed


def test_prefix_only_run_exports(tiny_runs, tmp_path, capsys):  # noqa: F811
    """plan=prefix has no LoRA: --peft is refused in one line; the merged export still round-trips."""
    assert main(["export", str(tiny_runs.b), "--peft", str(tmp_path / "peft")]) == 2
    err = capsys.readouterr().err
    # one line of ours (transformers' loading progress bars may precede it), no traceback
    assert "Traceback" not in err and [x for x in err.splitlines() if x.startswith("ptscale")] == [
        err.strip().splitlines()[-1]] and "no LoRA layers" in err
    assert main(["export", str(tiny_runs.b), "--merged", str(tmp_path / "merged")]) == 0
    run = load_run(tiny_runs.b)
    _same(ptscale.from_pretrained(tmp_path / "merged"), run.model, _batch(run))


@pytest.mark.parametrize("args, message", [
    (["export", "/nonexistent/run", "--merged", "/tmp/x"], "no such run directory"),
    (["export", "/tmp"], "name at least one of"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_export_dir_that_is_not_a_run(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--merged", str(tmp_path / "m")]) == 2
    assert "no recipe.yaml" in capsys.readouterr().err
