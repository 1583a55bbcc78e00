"""Every plan family on 2 ranks under ZeRO-3: each stage changes exactly its groups (all parameters gathered
and hashed before and after the stage), and nothing else."""

import json

import pytest

from ptscale.config import load_recipe
from ptscale.plans import plan_methods
from tests.launch import BIN, changed_groups, launch

FAST = ["eval.before_training=false", "data.train_size=128", "checkpoint.every_steps=0"]
STEPS = {"prefix": "{steps: 2, lr: 1.0e-3, evaluate: false}", "lora": "{steps: 2, lr: 1.0e-3, evaluate: false}",
         "adapter": "{steps: 2, lr: 1.0e-3, evaluate: false}", "full": "{steps: 2, lr: 1.0e-4, evaluate: false}"}


def methods(plan: str) -> list[str]:
    """Stage settings for exactly the methods the plan reads (setting another one is an error)."""
    return [f"methods.{m}={STEPS[m]}" for m in plan_methods(plan)]


@pytest.mark.slow
@pytest.mark.parametrize("plan, extra, expected", [
    ("alternate(prefix,lora,2)", [], [{"prefix"}, {"lora"}, {"prefix"}, {"lora"}]),
    ("adapter->prefix", ["adapter={kind: parallel, components: [qformer, language_model], budget: 4000}"],
     [{"adapter"}, {"adapter", "prefix"}]),
    ("prefix+full", [], [{"prefix", "vision", "qformer", "projection", "language_model"}]),
    ("prefix->adapter", ["adapter={kind: sequential, components: [qformer], bottleneck: 4}"],
     [{"prefix"}, {"prefix", "adapter"}]),
])
def test_plan_changes_exactly_its_groups(tmp_path, plan, extra, expected):
    launch([str(BIN / "deepspeed"), "--num_gpus", "2", "launchers/train.py", "--ds", "ds_configs/zero3.json",
             f"output_dir={tmp_path}", "run_name=p", f"plan={plan}", *methods(plan), *FAST, *extra], timeout=900)
    stage_dirs = sorted((tmp_path / "p").glob("stage-*"), key=lambda d: int(d.name.split("-")[1]))
    assert [changed_groups(d) for d in stage_dirs] == expected
    saved = load_recipe(tmp_path / "p" / "recipe.yaml")  # the run's recipe reloads as is
    assert [set(s.train) for s in saved.stages] == expected
    assert saved.plan == plan and json.loads((tmp_path / "p" / "run.json").read_text())["plan"] == plan
