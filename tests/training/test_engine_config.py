import json

import pytest
import torch

from ptscale.config import RecipeError, StageConfig
from ptscale.training.engine import adamw, load_ds_template, resolve_ds_config, warmup_linear_decay, zero_stage


def test_shipped_configs_resolve_every_auto():
    stage = StageConfig(train=["prefix"], batch_size=4, grad_accum=3, max_grad_norm=0.5)
    for name, expected in (("zero3", 3), ("zero2", 2)):
        cfg = resolve_ds_config(load_ds_template(f"ds_configs/{name}.json"), stage, "bf16", world_size=2)
        assert "auto" not in json.dumps(cfg)
        assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 3
        assert cfg["gradient_clipping"] == 0.5 and cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
        assert zero_stage(cfg) == expected


def test_auto_the_recipe_does_not_own_is_an_error():
    with pytest.raises(RecipeError, match="zero_optimization.reduce_bucket_size is 'auto'"):
        resolve_ds_config({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}},
                          StageConfig(train=["prefix"]), "fp32", 1)


def test_optimizer_section_is_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(RecipeError, match="remove the 'optimizer' section"):
        load_ds_template(path)
    path.write_text("{not json")
    with pytest.raises(RecipeError, match="not valid JSON"):
        load_ds_template(path)


def test_nvme_offload_needs_a_writable_directory(tmp_path):
    path = tmp_path / "ds.json"

    def offload(**nvme) -> dict:
        return {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme", **nvme}}}

    path.write_text(json.dumps(offload()))
    with pytest.raises(RecipeError, match="offload_optimizer.device is nvme but nvme_path is not set"):
        load_ds_template(path)
    path.write_text(json.dumps(offload(nvme_path=str(tmp_path / "missing"))))
    with pytest.raises(RecipeError, match="offload_optimizer.nvme_path .*missing: not a writable directory"):
        load_ds_template(path)
    path.write_text(json.dumps(offload(nvme_path=str(tmp_path))))
    assert load_ds_template(path)["zero_optimization"]["offload_optimizer"]["nvme_path"] == str(tmp_path)


def test_warmup_then_linear_decay_to_zero():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = warmup_linear_decay(opt, total_steps=10, warmup_steps=4)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lrs[4:] == pytest.approx([1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    assert all(a < b for a, b in zip(lrs[:4], lrs[1:5], strict=True))


def test_adamw_betas_and_no_decay_groups():
    m = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    opt = adamw(m, StageConfig(train=["x"], lr=0.1, weight_decay=0.05))
    assert opt.defaults["betas"] == (0.9, 0.99)
    decays = {g["weight_decay"]: len(g["params"]) for g in opt.param_groups}
    assert decays == {0.05: 1, 0.0: 3}  # only the Linear weight decays
