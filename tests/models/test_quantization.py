"""4/8-bit base weights through bitsandbytes (QLoRA-style), on CPU: what is quantised, what trains, what
is refused. The 2-rank ZeRO-3 run is in tests/training/test_quantized.py."""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")  # a dev dependency: skipped only where the extra is not installed

from ptscale.config import RecipeError, load_recipe  # noqa: E402
from ptscale.models.backbone import load_backbone, quantization_config  # noqa: E402
from ptscale.models.build import build_model  # noqa: E402
from ptscale.models.groups import group_of, group_sizes, is_quantized, set_trainable  # noqa: E402
from ptscale.prefix.model import PrefixTunedModel  # noqa: E402

LM_LORA = "lora.targets={language_model: [q_proj, v_proj]}"


@pytest.fixture
def saved(tmp_path, tiny_backbone):
    model, tok, proc = tiny_backbone
    for thing in (model, tok, proc):
        thing.save_pretrained(tmp_path)
    return tmp_path


def _batch(model, tok):
    torch.manual_seed(1)
    cfg = model.config
    ids = torch.tensor([[cfg.image_token_id] * cfg.num_query_tokens + tok("a red circle")["input_ids"]])
    pixels = torch.randn(1, 3, cfg.vision_config.image_size, cfg.vision_config.image_size)
    batch = {"pixel_values": pixels, "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    return {k: v.to(model.device) for k, v in batch.items()}  # bitsandbytes loads onto the GPU where there is one


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_4bit_quantises_the_towers_packed_in_the_model_dtype(saved, kind):
    full = load_backbone(saved)
    quant = load_backbone(saved, "fp32", kind)
    q4 = {n: m for n, m in quant.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert q4 and all(n.startswith(("vision_model.", "language_projection", "language_model.model.")) for n in q4)
    # transformers keeps BLIP-2's Q-Former (and the LM head) in full precision
    assert not any(n.startswith(("qformer.", "language_model.lm_head")) for n in q4)
    for m in q4.values():
        assert m.weight.dtype == torch.float32  # bnb_4bit_quant_storage = compute dtype: ZeRO-3 can shard it
        assert m.weight.quant_state.quant_type == kind
    # logical sizes, not the packed storage: the trainable share printed per stage stays honest
    assert group_sizes(PrefixTunedModel(quant.model, load_recipe().prefix)) == \
        group_sizes(PrefixTunedModel(full.model, load_recipe().prefix))


def test_quantization_config_storage_follows_the_model_dtype():
    assert quantization_config("none", "fp32") is None
    q = quantization_config("nf4", "bf16")
    assert q.bnb_4bit_quant_storage == torch.bfloat16 and q.bnb_4bit_compute_dtype == torch.bfloat16
    assert q.bnb_4bit_use_double_quant
    assert quantization_config("int8", "fp32").load_in_8bit


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_lora_on_quantised_layers_trains_only_lora_and_prefix(saved, kind):
    backbone = load_backbone(saved, "fp32", kind)
    cfg = load_recipe(None, [f"model.quantization={kind}", LM_LORA])
    base = _batch(backbone.model, backbone.tokenizer)
    with torch.no_grad():
        reference = backbone.model(**base).logits
    model = build_model(cfg, backbone)
    with torch.no_grad():  # fresh prefixes perturb; with them off, LoRA (B = 0) leaves the quantised base exact
        with model.prefixes_disabled():
            assert torch.equal(model(**base).logits, reference)
    lora_layers = [m for n, m in model.named_modules() if n.endswith("q_proj") and hasattr(m, "lora_A")]
    assert lora_layers and all(is_quantized(m.base_layer.weight) for m in lora_layers)
    set_trainable(model, ["prefix", "lora"])
    model.train()
    model(**base).loss.backward()
    grads = {group_of(n) for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == {"prefix", "lora"}


def test_a_plan_training_quantised_weights_fails_before_training():
    with pytest.raises(RecipeError, match=r"stages\.1\.train: trains .*language_model.*model.quantization=nf4"):
        load_recipe(None, ["model.quantization=nf4", "plan=prefix->full", "methods.full={epochs: 1, lr: 1.0e-5}"])
    load_recipe(None, ["model.quantization=nf4", "plan=prefix->lora"])  # LoRA on a quantised base is the point


def test_build_refuses_a_stage_that_would_train_a_quantised_weight(saved):
    cfg = load_recipe(None, ["model.quantization=nf4", LM_LORA])
    cfg.stages[1].train = ["prefix", "language_model"]  # past validation, as another model family could be
    with pytest.raises(RecipeError, match=r"stages\.1\.train: .*stored quantized.*language_model"):
        build_model(cfg, load_backbone(saved, "fp32", "nf4"))


def test_set_trainable_never_marks_a_quantised_weight(saved):
    model = PrefixTunedModel(load_backbone(saved, "fp32", "nf4").model, load_recipe().prefix)
    with pytest.raises(ValueError, match="stored quantized"):
        set_trainable(model, ["vision"])


def test_cpu_4bit_layers_keep_the_portable_layout(saved):
    """An in-place AVX512-BF16 repack at eval time would land in ZeRO-3's temporary gathered copy."""
    model = load_backbone(saved, "fp32", "nf4").model
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)


def test_quantised_base_refusals_name_the_fix():
    with pytest.raises(RecipeError, match="random weights, nothing to quantise; set model.path"):
        load_recipe(None, ["model.quantization=nf4", "model.pretrain_steps=0"])
    with pytest.raises(RecipeError, match=r"adapter.components: language_model are quantised.*\[qformer\]"):
        load_recipe(None, ["model.quantization=nf4", "plan=prefix->adapter", "methods.adapter={steps: 1, lr: 1.0e-3}",
                           "adapter={kind: parallel, components: [qformer, language_model], bottleneck: 4}"])
    load_recipe(None, ["model.quantization=nf4", "plan=prefix->adapter", "methods.adapter={steps: 1, lr: 1.0e-3}",
                       "adapter={kind: parallel, components: [qformer], bottleneck: 4}"])


@pytest.mark.slow  # launchers/train.py in a subprocess, DeepSpeed loaded
def test_int8_under_zero3_is_refused_before_training(tmp_path):
    """bitsandbytes keeps every int8 matrix whole beside its ZeRO-3 shard: no memory would be saved."""
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run([sys.executable, "launchers/train.py", "--ds", "ds_configs/zero3.json",
                           f"output_dir={tmp_path}", "model.quantization=int8"],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.quantization=int8 under ZeRO-3" in proc.stderr and "zero2.json" in proc.stderr
    assert "Traceback" not in proc.stderr
