"""Exports: LoRA in PEFT's format (checked against PeftModel's own save and load) and the merged model
(checked by reloading with transformers and re-applying the prefixes)."""

import copy
import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoTokenizer, Blip2ForConditionalGeneration

from ptscale.config import LoraConfig, PrefixConfig
from ptscale.hub import from_pretrained
from ptscale.prefix.model import PrefixTunedModel
from ptscale.tuners.adapter import AdapterConfig, inject_adapters
from ptscale.tuners.export import (
    PREFIX_FILE,
    WITH_PREFIXES_DIR,
    ExportError,
    export_lora_peft,
    export_merged,
    read_manifest,
)
from ptscale.tuners.lora import inject_lora

QKV = ["attention.attention.query", "attention.attention.key", "attention.attention.value"]
LORA = LoraConfig(targets={"qformer": QKV}, r=4, alpha=8, dropout=0.05)


def _batch(model):
    torch.manual_seed(1)
    q, img = model.config.num_query_tokens, model.config.image_token_id
    ids = torch.tensor([[img] * q + [2, 7, 8, 9, 10], [img] * q + [2, 7, 8, 1, 1]])
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    return {"pixel_values": torch.randn(2, 3, 32, 32), "input_ids": ids, "attention_mask": mask}


@pytest.fixture
def trained(tiny_backbone):
    """A LoRA + prefix model whose LoRA B and prefixes are non-zero (as after training), the untouched base
    model it was built from, and the tokenizer / image processor."""
    base, tok, proc = tiny_backbone
    pristine = copy.deepcopy(base)
    model = PrefixTunedModel(base, PrefixConfig(lengths={"qformer": 3, "language_model": 3}, encoder_hidden=8,
                                                init_std=0.5))
    inject_lora(model, LORA)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval(), pristine, tok, proc


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_lora_peft_export_loads_in_peft_with_same_logits(trained, tmp_path):
    model, pristine, _, _ = trained
    batch = _batch(pristine)
    with model.prefixes_disabled():
        ours = _logits(model, batch)
    assert not torch.allclose(ours, _logits(pristine, batch))  # the LoRA update is not zero

    export_lora_peft(model, tmp_path / "ours", LORA)
    loaded = PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(_logits(loaded, batch), ours)

    # same files as PEFT's own save_pretrained for the same targets
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    reference = get_peft_model(copy.deepcopy(pristine), PeftLoraConfig(
        r=LORA.r, lora_alpha=LORA.alpha, lora_dropout=LORA.dropout, target_modules=cfg["target_modules"]))
    reference.save_pretrained(str(tmp_path / "peft"))
    ref_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == set(
        load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert len(cfg["target_modules"]) == 3 * pristine.config.qformer_config.num_hidden_layers
    # identical config, up to the order of the target set
    cfg["target_modules"], ref_cfg["target_modules"] = sorted(cfg["target_modules"]), sorted(ref_cfg["target_modules"])
    assert cfg == ref_cfg


def test_lora_peft_export_from_gathered_state(trained, tmp_path):
    model, _, _, _ = trained
    state = {n: p.detach() * 3 for n, p in model.named_parameters() if ".lora_" in n}
    export_lora_peft(model, tmp_path, LORA, state=state)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    name = "qformer.encoder.layer.1.attention.attention.value"
    torch.testing.assert_close(saved[f"base_model.model.{name}.lora_B.weight"],
                               state[f"base.{name}.lora_B.default.weight"])
    missing = dict(state)
    missing.pop(f"base.{name}.lora_A.default.weight")
    with pytest.raises(ExportError, match="state has no base.qformer.encoder.layer.1"):
        export_lora_peft(model, tmp_path / "x", LORA, state=missing)
    with pytest.raises(ExportError, match="trained with r=4"):
        export_lora_peft(model, tmp_path / "y", LoraConfig(targets=LORA.targets, r=4, alpha=16))


def test_merged_export_reloads_with_same_logits(trained, tmp_path):
    model, pristine, tok, proc = trained
    batch = _batch(pristine)
    with_prefix = _logits(model, batch)
    with model.prefixes_disabled():
        without = _logits(model, batch)
    assert not torch.allclose(with_prefix, without)

    export_merged(model, tmp_path, tokenizer=tok, image_processor=proc)
    # the transformers model alone is base + LoRA, so it is not where from_pretrained(tmp_path) would find it
    assert not (tmp_path / "config.json").exists()
    plain = Blip2ForConditionalGeneration.from_pretrained(str(tmp_path / WITH_PREFIXES_DIR)).eval()
    assert not any(".lora_" in n or "base_layer" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(_logits(plain, batch), without)  # LoRA is in the weights
    manifest = read_manifest(tmp_path)
    assert manifest["reproduces_trained_model"] == {"ptscale.from_pretrained": True,
                                                    "transformers.from_pretrained": False,
                                                    "transformers+DynamicCache": False}  # a Q-Former prefix too
    assert any("does NOT reproduce" in w and "qformer: 3" in w for w in manifest["warnings"])
    assert manifest["prefixes"] == {"kind": "classic", "positions": "shift",
                                    "targets": {"qformer": 3, "language_model": 3}}

    reloaded = from_pretrained(tmp_path)
    assert all(reloaded.folded().values()) and set(reloaded.folded()) == {"qformer", "language_model"}
    torch.testing.assert_close(_logits(reloaded, batch), with_prefix)

    # the exported model is left as it was: LoRA unmerged, prefixes unfolded
    assert any(".lora_B." in n for n, _ in model.named_parameters())
    assert not any(model.folded().values())
    torch.testing.assert_close(_logits(model, batch), with_prefix, rtol=0, atol=0)
    # and the tokenizer / image processor travel with the weights
    sub = str(tmp_path / WITH_PREFIXES_DIR)
    assert AutoTokenizer.from_pretrained(sub)("a photo of")["input_ids"] == tok("a photo of")["input_ids"]
    assert (tmp_path / WITH_PREFIXES_DIR / "preprocessor_config.json").is_file()


def test_lora_export_with_prefixes_reloads_through_ptscale(trained, tmp_path):
    """--peft: PEFT alone attaches the LoRA only (and says so); ptscale.from_pretrained attaches both."""
    import ptscale

    model, pristine, _, _ = trained
    pristine.save_pretrained(tmp_path / "base")
    export_lora_peft(model, tmp_path / "lora", LORA, base_model_name_or_path=tmp_path / "base")
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tmp_path / "base")
    manifest = read_manifest(tmp_path / "lora")
    assert manifest["base"]["sha256"]
    assert manifest["reproduces_trained_model"]["peft.PeftModel.from_pretrained"] is False
    assert any("PeftModel.from_pretrained on this directory does NOT reproduce" in w for w in manifest["warnings"])
    batch = _batch(pristine)
    reloaded = ptscale.from_pretrained(tmp_path / "lora")
    assert any(".lora_B." in n for n, _ in reloaded.named_parameters())  # attached, not merged: exact
    torch.testing.assert_close(_logits(reloaded, batch), _logits(model, batch), rtol=0, atol=0)
    # another base than the recorded one is refused, not silently used
    with torch.no_grad():
        pristine.language_model.lm_head.weight.add_(1.0)
    pristine.save_pretrained(tmp_path / "base")
    with pytest.raises(FileNotFoundError, match="sha256"):
        ptscale.from_pretrained(tmp_path / "lora")


def test_merged_export_prefix_tuning_plus(tiny_backbone, tmp_path):
    """Prefix-Tuning+ (gated memory, its own parameters beside the folded keys/values) and no LoRA."""
    base, _, _ = tiny_backbone
    model = PrefixTunedModel(base, PrefixConfig(lengths={"qformer": 2, "language_model": 3}, kind="plus",
                                                encoder_hidden=8, feature_map="relu")).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.prefixes.parameters():  # gates start at 0: make the memory matter
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    batch = _batch(base)
    expected = _logits(model, batch)
    with model.prefixes_disabled():
        assert not torch.allclose(_logits(model, batch), expected)
    export_merged(model, tmp_path)
    reloaded = from_pretrained(tmp_path)
    assert reloaded.kind == "plus" and {m.feature_map for m in reloaded.prefixes.values()} == {"relu"}
    torch.testing.assert_close(_logits(reloaded, batch), expected)


def test_merged_export_without_prefixes(tiny_backbone, tmp_path):
    base, _, _ = tiny_backbone
    model = PrefixTunedModel(base, PrefixConfig(lengths={})).eval()
    export_merged(model, tmp_path)
    assert not (tmp_path / PREFIX_FILE).exists()
    batch = _batch(base)
    torch.testing.assert_close(_logits(from_pretrained(tmp_path), batch), _logits(model, batch))


def test_merged_export_refuses_adapters(tiny_backbone, tmp_path):
    base, _, _ = tiny_backbone
    model = PrefixTunedModel(base, PrefixConfig(lengths={"qformer": 0, "language_model": 0}))
    inject_adapters(model, AdapterConfig(kind="parallel", components=["qformer"], bottleneck=2))
    with pytest.raises(ExportError, match="adapters, which cannot be merged"):
        export_merged(model, tmp_path)
    assert not any(tmp_path.iterdir())


def test_backbone_digest(tiny_backbone, tmp_path):
    """The sha256 of the weight files: for one model.safetensors, the plain file hash (what the default
    backbone's marker records); another weight changes it; a directory without weights is an error."""
    import hashlib

    from ptscale.models.backbone import backbone_digest

    base, _, _ = tiny_backbone
    base.save_pretrained(tmp_path / "a")
    digest = backbone_digest(tmp_path / "a")
    assert digest == hashlib.sha256((tmp_path / "a" / "model.safetensors").read_bytes()).hexdigest()
    with torch.no_grad():
        base.language_model.lm_head.weight[0, 0] += 1.0
    base.save_pretrained(tmp_path / "b")
    assert backbone_digest(tmp_path / "b") != digest
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no weight files"):
        backbone_digest(tmp_path / "empty")


def test_runs_saved_before_prefix_positions_reload_with_keep(tmp_path):
    """A recipe.yaml without prefix.positions was trained with positions 0..L-1: reloading must not shift them."""
    from ptscale.config import load_recipe
    from ptscale.rundir import load_run_recipe

    old, new = tmp_path / "old", tmp_path / "new"
    stages = "stages: [{train: [prefix], steps: 1}]\n"
    for run, positions in ((old, ""), (new, ", positions: shift")):
        run.mkdir()
        lengths = "{qformer: 8, language_model: 8}"
        (run / "recipe.yaml").write_text(stages + f"prefix: {{lengths: {lengths}{positions}}}\n")
    assert load_run_recipe(old).prefix.positions == "keep"
    assert load_run_recipe(new).prefix.positions == "shift"
    assert load_recipe(old / "recipe.yaml").prefix.positions == "shift"  # the default for new recipes
