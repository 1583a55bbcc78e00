"""A stage switch inside one process leaks nothing: RSS after 5 more switches stays within a few % of the
RSS after the first (DeepSpeed's destroy() alone keeps every old engine alive through its hooks)."""

import gc
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import gc, json, resource, sys, weakref
    import torch
    from ptscale.config import LoraConfig, PrefixConfig, StageConfig
    from ptscale.models.groups import set_trainable
    from ptscale.models.pretrain import new_tiny_model
    from ptscale.prefix.model import PrefixTunedModel
    from ptscale.training import engine as ds
    from ptscale.tuners.lora import inject_lora

    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    ds.init_distributed()
    base, tok = new_tiny_model("tiny-blip2-opt")
    # Wider layers than the default so that a leaked engine (fp32 masters, Adam state, grads) shows in RSS.
    model = PrefixTunedModel(base, PrefixConfig(lengths={"qformer": 8, "language_model": 8}, encoder_hidden=2048))
    inject_lora(model, LoraConfig(targets={"qformer": ["attention.attention.query", "attention.attention.value"]}))
    template = ds.load_ds_template("ds_configs/zero3.json")
    q, img = model.config.num_query_tokens, model.config.image_token_id
    ids = torch.tensor([[img] * q + [2, 7, 8, 9]] * 2)
    batch = {"pixel_values": torch.randn(2, 3, 32, 32), "input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": ids}
    rss, alive = [], []
    for i in range(6):
        stage = StageConfig(train=["prefix"] if i % 2 == 0 else ["prefix", "lora"], batch_size=2)
        set_trainable(model, stage.train)
        engine = ds.build_engine(model, stage, ds.resolve_ds_config(template, stage, "fp32", 1), 10)
        for _ in range(2):
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
        alive.append(weakref.ref(engine))
        ds.release(engine)
        del engine, loss
        gc.collect()
        rss.append(rss_mib())
    print(json.dumps({"rss": rss, "alive": sum(r() is not None for r in alive)}))
""")


@pytest.mark.slow
def test_stage_switches_do_not_leak():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    import json

    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rss = result["rss"]
    assert result["alive"] == 0, "old engines are still referenced after release"
    assert rss[-1] <= rss[0] * 1.05, rss
    gc.collect()
