"""Sharded construction: zero.Init through transformers' HfDeepSpeedConfig path, checked on one rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ptscale.training.engine import free_port
from ptscale.training.sharded import check_zero3_config

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh process: zero.Init patches torch globally while active, HfDeepSpeedConfig registers a
# process-wide weak reference, and the gloo group must not leak into other tests.
SHARDED_BUILD = r"""
import gc, json
import deepspeed, torch
from transformers.integrations import is_deepspeed_zero3_enabled
from ptscale.config import LoraConfig, PrefixConfig, StageConfig
from ptscale.training.sharded import build_sharded_backbone, cast_added_parameters
from ptscale.prefix.model import PrefixTunedModel
from ptscale.tuners.lora import inject_lora
from ptscale.training import engine as ds

dist = ds.init_distributed()
stage = StageConfig(name="prefix+lora", train=["prefix", "lora"], steps=1, lr=1e-2, batch_size=2)
cfg = ds.resolve_ds_config(ds.load_ds_template("ds_configs/zero3.json"), stage, "bf16", dist.world_size)
# model.path under ZeRO-3: a saved checkpoint loads into the partitions, every value intact.
import tempfile
from ptscale.models.pretrain import new_tiny_model, tiny_processor
from ptscale.training.sharded import load_sharded_backbone
ref, tok = new_tiny_model("tiny-blip2-opt", seed=0)  # plain construction, before any HfDeepSpeedConfig
ckpt = tempfile.mkdtemp()
ref.save_pretrained(ckpt), tok.save_pretrained(ckpt), tiny_processor().save_pretrained(ckpt)
reference = {n: p.detach().clone() for n, p in ref.named_parameters()}
del ref
fp32 = ds.resolve_ds_config(ds.load_ds_template("ds_configs/zero3.json"), stage, "fp32", dist.world_size)
loaded, under_init = load_sharded_backbone(ckpt, fp32, "fp32")
assert under_init
sharded, differ = [], []
for n, p in loaded.model.named_parameters():
    sharded.append(hasattr(p, "ds_id") and p.numel() == 0)
    with deepspeed.zero.GatheredParameters([p]):
        if not torch.equal(p.detach(), reference[n]):
            differ.append(n)
loaded_report = {"params": len(sharded), "expected": len(reference), "all_sharded": all(sharded), "differ": differ}
del loaded
gc.collect()

# The HfDeepSpeedConfig must outlive the call that built the model, and go with the model.
probe = build_sharded_backbone("tiny-blip2-opt", cfg, "bf16")
gc.collect()
lifetime = {"while_model_lives": is_deepspeed_zero3_enabled()}
del probe
gc.collect()
lifetime["after_model_freed"] = is_deepspeed_zero3_enabled()

bb = build_sharded_backbone("tiny-blip2-opt", cfg, "bf16")
params = dict(bb.model.named_parameters())
out = {"world": dist.world_size, "all_sharded": all(hasattr(p, "ds_id") for p in params.values()),
       "local_numel": {n: p.numel() for n, p in params.items()},
       "ds_shape": {n: list(p.ds_shape) for n, p in params.items()},
       "dtypes": sorted({str(p.ds_tensor.dtype) for p in params.values()}),
       "vocab": bb.model.config.text_config.vocab_size, "tokenizer": len(bb.tokenizer),
       "image_size": bb.image_processor.size["height"], "lifetime": lifetime,
       "loaded": loaded_report}
fc1 = params["language_model.model.decoder.layers.0.fc1.weight"]
norm = params["language_model.model.decoder.layers.0.final_layer_norm.weight"]
with deepspeed.zero.GatheredParameters([fc1, norm]):
    out["gathered_fc1_shape"] = list(fc1.shape)
    out["fc1_std"] = fc1.float().std().item()
    out["norm_all_ones"] = bool((norm == 1).all())

model = PrefixTunedModel(bb.model, PrefixConfig())
inject_lora(model, LoraConfig())
out["cast"] = cast_added_parameters(model, "bf16")
from ptscale.models.groups import set_trainable
set_trainable(model, stage.train)
engine = ds.build_engine(model, stage, cfg, total_steps=1)
pixel = torch.randn(2, 3, 32, 32)
ids = torch.tensor([[4] * 8 + [2, 10, 11, 2]] * 2)
loss = engine(pixel_values=pixel, input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
engine.backward(loss)
engine.step()
out["loss"] = loss.item()
ds.release(engine)
print("RESULT " + json.dumps(out))
"""



@pytest.fixture(scope="module")
def sharded() -> dict:
    port = free_port()
    env = {**os.environ, "MASTER_PORT": port, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        env.pop(key, None)  # a world of one, whatever launched pytest
    try:
        proc = subprocess.run([sys.executable, "-c", SHARDED_BUILD], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
    finally:  # DeepSpeed's CPU shm allreduce never unlinks its 66 MiB /dev/shm segment
        for segment in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            segment.unlink(missing_ok=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_sharded_build_partitions_every_parameter_with_the_preset_geometry(sharded):
    from transformers import Blip2ForConditionalGeneration

    from ptscale.models.presets import blip2_config

    assert sharded["world"] == 1 and sharded["all_sharded"]
    # A world of one holds whole partitions, so "partitioned" shows as ZeRO-3 metadata plus an empty
    # module-visible tensor (released outside a forward), not as a smaller shard.
    assert set(sharded["local_numel"].values()) == {0}
    import torch

    with torch.device("meta"):
        reference = Blip2ForConditionalGeneration(blip2_config("tiny-blip2-opt"))
    expected = {n: list(p.shape) for n, p in reference.named_parameters()}
    assert sharded["ds_shape"] == expected
    assert sharded["gathered_fc1_shape"] == [256, 128]  # OPT ffn_dim x hidden of the tiny preset
    assert sharded["dtypes"] == ["torch.bfloat16"]
    assert sharded["vocab"] == 50272 > sharded["tokenizer"]  # preset vocabulary; the word tokenizer uses a prefix
    assert sharded["image_size"] == 48  # the tiny preset's images (ptscale.data.synthetic.IMAGE_SIZE)


def test_sharded_build_initialises_weights_through_the_gathered_path(sharded):
    # initialize_weights_zero3 gathers each module and runs HF's init on rank 0: Linear ~ N(0, 0.02),
    # LayerNorm weight 1. Skipped init would leave zeros or uninitialised memory.
    assert 0.017 < sharded["fc1_std"] < 0.023
    assert sharded["norm_all_ones"]


def test_model_path_loads_into_the_partitions_exactly(sharded):
    loaded = sharded["loaded"]
    assert loaded["params"] == loaded["expected"] and loaded["all_sharded"]
    assert loaded["differ"] == []


def test_hf_deepspeed_config_lives_exactly_as_long_as_the_model(sharded):
    assert sharded["lifetime"] == {"while_model_lives": True, "after_model_freed": False}


def test_prefixes_and_lora_added_after_a_sharded_build_train_in_bf16(sharded):
    # Without the cast, ZeRO-3 stops at "assert len(set(t.dtype for t in tensors)) == 1".
    assert sharded["cast"] > 0
    assert sharded["loss"] == sharded["loss"] and sharded["loss"] > 0  # finite, positive cross-entropy


@pytest.mark.parametrize("bad, message", [
    ({"zero_optimization": {"stage": 2}}, "stage-3"),
    ({"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}}, "'auto' at bf16.enabled"),
    ({"zero_optimization": {"stage": 3}, "fp16": {"enabled": True}}, "enables \\['fp16'\\]"),
])
def test_sharded_build_refuses_configs_it_cannot_honour(bad, message):
    with pytest.raises(ValueError, match=message):
        check_zero3_config(bad, "bf16")


def test_cast_leaves_a_model_not_built_sharded_to_the_engine():
    import torch

    from ptscale.training.sharded import cast_added_parameters

    layer = torch.nn.Linear(4, 4)
    assert cast_added_parameters(layer, "bf16") == 0 and layer.weight.dtype == torch.float32
