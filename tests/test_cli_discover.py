"""What a newcomer can discover from the command line: `ptscale ls` lists what the code supports (read from the
registries, so a new preset, plan form, group or recipe shows up by itself), `ptscale cp` copies a shipped recipe,
docs/recipe.md is generated from the config definitions, and a recipe typo is reported before torch loads."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ptscale import listing
from ptscale.config import load_recipe
from ptscale.docs import markdown, recipe_keys
from ptscale.models.families import FAMILIES
from ptscale.models.groups import GROUP_ALIASES, GROUPS
from ptscale.models.presets import ALL_PRESETS
from ptscale.plans import METHODS

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return subprocess.run([sys.executable, "-m", "ptscale.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


# --- a typo before heavy imports -------------------------------------------------------------------------------

def test_a_recipe_typo_is_reported_before_torch_is_imported(tmp_path):
    """The error path imports no torch / transformers / deepspeed: measured, about 0.3-0.5 s on a 2-core machine
    (importing torch alone takes longer than the whole command)."""
    probe = ("import sys, ptscale.cli as c\n"
             "code = c.main(['train', f'output_dir={sys.argv[1]}', 'model.colour=red'])\n"
             "heavy = sorted(m for m in ('torch', 'transformers', 'deepspeed', 'peft') if m in sys.modules)\n"
             "print('HEAVY', heavy, 'CODE', code)\n")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    seconds = time.perf_counter() - t0
    assert "HEAVY [] CODE 2" in proc.stdout, proc.stdout + proc.stderr
    assert "model.colour" in proc.stderr and "Traceback" not in proc.stderr
    assert seconds < 5.0, f"{seconds:.1f} s"  # shared 2-core CI; measured 0.3-0.5 s idle
    assert not (tmp_path / "out").exists()


def test_the_train_command_line_typo_exits_2_quickly(tmp_path):
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "launchers/train.py", f"output_dir={tmp_path}", "model.colour=red"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "model.colour" in proc.stderr
    assert time.perf_counter() - t0 < 5.0


# --- ls ----------------------------------------------------------------------------------------------------------

def test_ls_lists_every_preset_plan_form_group_and_recipe(capsys):
    assert listing.run_ls(argparse.Namespace(what=None, model=None, path=None, help_text=False,
                                             markdown=False)) == 0
    out = capsys.readouterr().out
    for preset in ALL_PRESETS:
        assert preset in out
    for method in METHODS:
        assert f"\n  {method} " in out and f"prefix->{method}" in out or method == "prefix"
    for group in (*FAMILIES["blip2"].groups, *GROUP_ALIASES):  # the default model's groups (BLIP's: their own)
        assert f"\n  {group} " in out
    for recipe in listing.shipped_recipes():
        assert f"\n  {recipe} " in out


@pytest.mark.parametrize("preset", ["tiny-blip", "tiny-vinvl", "tiny-llama-text"])
def test_ls_groups_and_targets_of_the_other_families_presets(capsys, preset):
    for what in ("groups", "targets"):
        assert listing.run_ls(argparse.Namespace(what=what, model=preset, path=None, help_text=False,
                                                 markdown=False)) == 0
    out = capsys.readouterr().out
    assert f"of {preset}" in out and "prefix " in out and "self" in out  # sizes, then the attention Linear targets


def test_every_listed_plan_expands(tmp_path):
    """The listed plans are the plan module's forms: each one loads as a recipe."""
    for plan in listing.plan_forms():
        extra = ["adapter={kind: sequential, components: [qformer], bottleneck: 4}"] if "adapter" in plan else []
        cfg = load_recipe(None, [f"plan={plan}", *extra])
        assert cfg.plan == plan and cfg.stages


def test_group_sizes_are_the_models_own():
    """The default model's groups as training counts them (566,272 parameters with prefixes and LoRA: the
    training log's 'of 566,272 parameters')."""
    sizes = listing.group_sizes("tiny-blip2-opt", None)
    assert set(sizes) == set(GROUPS)
    assert sum(sizes.values()) == 566_272
    # LoRA r16 on q/k/v of both towers' self-attention: Q-Former 2 x 3 x 2 x 64 x 16, OPT 2 x 3 x 2 x 128 x 16
    assert sizes["prefix"] == 64_064 and sizes["lora"] == 12_288 + 24_576 and sizes["adapter"] == 0


def test_lora_targets_come_from_the_models_linear_modules_and_match_the_default():
    from ptscale.config import LoraConfig

    found = listing.lora_targets(listing.meta_model("tiny-blip2-opt", None))
    assert set(found) == {"vision", "qformer", "language_model"}  # BLIP-2's towers (BLIP's are not listed for it)
    for component, targets in LoraConfig().targets.items():
        assert set(targets) <= set(found[component])
    assert "self_attn.q_proj" in found["language_model"] and "crossattention.attention.query" in found["qformer"]


@pytest.mark.slow  # a CLI process that loads torch before it reads --model
def test_ls_of_an_unknown_model_is_one_line():
    proc = run_cli("ls", "groups", "--model", "nope")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"ptscale: error: --model: unknown preset 'nope'; known: {', '.join(ALL_PRESETS)} (`ptscale ls presets`)"]


# --- shipped recipes and cp ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(listing.shipped_recipes()))
def test_every_shipped_recipe_loads_and_sets_only_keys_its_plan_uses(name, tmp_path):
    """A user recipe's explicit keys must all be used by its plan (else the config refuses them): loading it
    as the user's own file proves it."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(listing.recipe_text(name))
    cfg = load_recipe(path)
    assert cfg.stages and listing.shipped_recipes()[name]  # and it says what it is


def test_cp_writes_a_recipe_and_refuses_to_overwrite(tmp_path):
    target = tmp_path / "my.yaml"
    proc = run_cli("cp", "pt-full", str(target))
    assert proc.returncode == 0 and target.read_text() == listing.recipe_text("pt-full")
    target.write_text("plan: lora\n")
    proc = run_cli("cp", "pt-full", str(target))
    assert proc.returncode == 2 and "exists" in proc.stderr and "--force" in proc.stderr
    assert target.read_text() == "plan: lora\n"
    assert run_cli("cp", "pt-full", str(target), "--force").returncode == 0
    assert target.read_text() == listing.recipe_text("pt-full")
    proc = run_cli("cp", "nope", str(tmp_path / "x.yaml"))
    assert proc.returncode == 2 and "ptscale ls recipes" in proc.stderr


# --- the generated reference ----------------------------------------------------------------------------------------

def test_docs_recipe_md_is_the_generated_reference():
    """Regenerate with: python -m ptscale.docs > docs/recipe.md"""
    assert (ROOT / "docs" / "recipe.md").read_text() == markdown()


def test_every_recipe_key_is_documented_with_its_default():
    keys = {d.key: d for d in recipe_keys()}
    for key in ("model.preset", "prefix.lengths", "lora.targets", "adapter.budget", "methods.lora.lr",
                "stages.N.train", "data.on_bad_data", "eval.num_beams", "checkpoint.every_steps", "plan", "seed"):
        assert keys[key].help, key
    assert keys["methods.lora.lr"].default == "0.001" and keys["methods.full.lr"].default == "0.0001"
    assert keys["model.dtype"].type == "fp32 | bf16 | fp16"


# --- global flags ------------------------------------------------------------------------------------------------

def test_bare_ptscale_prints_help_and_version_is_known():
    proc = run_cli()
    assert proc.returncode == 0 and "ls" in proc.stdout and "cp" in proc.stdout and "--verbose" in proc.stdout
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("ptscale ")


def test_the_top_level_help_imports_no_torch():
    """Each command's module is imported only when it runs: `ptscale` and `ptscale --help` answer at once."""
    code = "import sys; from ptscale.cli import main; main([]); print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "False", proc.stdout + proc.stderr
    for command in ("score", "eval", "analyze", "report", "export", "grid"):
        assert f"    {command} " in proc.stdout  # every command is listed


def test_verbose_and_quiet_exclude_each_other():
    proc = run_cli("config", "-v", "-q")
    assert proc.returncode == 2 and "not allowed with" in proc.stderr


@pytest.mark.slow  # two CLI processes that build the model's skeleton (torch, transformers)
def test_ls_of_language_models():
    """A language-model checkpoint's groups (full = the language model) and default LoRA targets (q / v)."""
    groups = run_cli("ls", "groups", "--model", "tiny-llama-text")
    assert groups.returncode == 0, groups.stderr
    assert "qformer" not in groups.stdout and "= language_model" in groups.stdout
    targets = run_cli("ls", "targets")
    assert "llama lora.targets.language_model: q_proj v_proj" in targets.stdout
