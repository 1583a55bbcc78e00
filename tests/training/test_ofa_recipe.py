"""OFA by recipe on 2 ranks under ZeRO-3 (the embedded tiny OFA; prefixes in its encoder's and decoder's
self-attention through the module wrapper): captioning prefix -> LoRA learns (CIDEr after training above before,
each stage changing exactly its groups), and the other plan families change exactly their groups on captioning
and on VQA (the question as OFA's instruction)."""

import json

import pytest

from ptscale.config import load_recipe
from tests.launch import BIN, changed_groups, launch, prefix_then_lora_learns_on_two_ranks
from tests.training.test_plans import FAST, methods

OFA = ["model.preset=tiny-ofa", "plan=prefix->lora"]


@pytest.mark.slow
def test_ofa_captioning_prefix_then_lora_two_ranks_zero3(tmp_path):
    prefix_then_lora_learns_on_two_ranks(tmp_path, "ofa", OFA)


@pytest.mark.slow
@pytest.mark.parametrize("plan, task, extra, expected", [
    ("prefix+full", "downstream", [], [{"prefix", "vision", "language_model"}]),
    ("prefix->adapter", "vqa", ["adapter={kind: parallel, components: [language_model], bottleneck: 4}",
                                "methods.adapter.evaluate=true", "data.eval_size=8"],
     [{"prefix"}, {"prefix", "adapter"}]),
])
def test_ofa_plan_changes_exactly_its_groups(tmp_path, plan, task, extra, expected):
    launch([str(BIN / "deepspeed"), "--num_gpus", "2", "launchers/train.py", "--ds", "ds_configs/zero3.json",
            f"output_dir={tmp_path}", "run_name=p", "model.preset=tiny-ofa", f"data.task={task}", f"plan={plan}",
            *methods(plan), *FAST, *extra], timeout=900)
    run = tmp_path / "p"
    stage_dirs = sorted(run.glob("stage-*"), key=lambda d: int(d.name.split("-")[1]))
    assert [changed_groups(d) for d in stage_dirs] == expected
    assert [set(s.train) for s in load_recipe(run / "recipe.yaml").stages] == expected
    if task == "vqa":  # the answers are scored with the VQA accuracy after the last stage
        evaluations = json.loads((run / "results.json").read_text())["evaluations"]
        assert [e["point"] for e in evaluations] == ["prefix+adapter"]
        assert 0 <= evaluations[0]["metrics"]["VQA_accuracy"] <= 100
