"""Model families: detected from a checkpoint's config.json, overridable, refused when unsupported; the
parameter groups of standalone language models; the recipe's family defaults."""

import json

import pytest

from ptscale.config import load_recipe
from ptscale.errors import RecipeError
from ptscale.models.families import FAMILIES, resolve_family
from ptscale.models.groups import group_of, group_sizes
from ptscale.prefix.model import PrefixTunedModel
from ptscale.tuners.lora import inject_lora


def _config_dir(tmp_path, model_type):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return tmp_path


@pytest.mark.parametrize("model_type,family", [("blip-2", "blip2"), ("opt", "opt"), ("llama", "llama"),
                                               ("qwen2", "qwen2"), ("t5", "t5")])
def test_family_is_detected_from_config_json(tmp_path, model_type, family):
    assert resolve_family(None, str(_config_dir(tmp_path, model_type)), "blip2") == family


def test_unsupported_model_type_is_refused_naming_it_and_the_supported_ones(tmp_path):
    supported = r"blip-2 \(blip2\), blip, vinvl, ofa, opt, llama, qwen2, t5"
    with pytest.raises(RecipeError, match=rf"'gpt2' checkpoint.*{supported}"):
        resolve_family(None, str(_config_dir(tmp_path, "gpt2")), "blip2")


def test_family_override_must_match_the_checkpoint(tmp_path):
    path = str(_config_dir(tmp_path, "opt"))
    assert resolve_family("opt", path, "blip2") == "opt"
    with pytest.raises(RecipeError, match="model.family=llama, but model.path .* holds an? opt checkpoint"):
        resolve_family("llama", path, "blip2")
    with pytest.raises(RecipeError, match="model.family: 'gpt2' is not supported"):
        resolve_family("gpt2", None, "blip2")


def _lm_recipe(lm_dirs, text_data, family, *overrides):
    train, evals = text_data
    return load_recipe(None, [f"model.path={lm_dirs[family]}", "data.name=text", f"data.train_file={train}",
                              f"data.eval_file={evals}", *overrides])


def test_language_model_recipe_gets_its_family_defaults(lm_dirs, text_data):
    cfg = _lm_recipe(lm_dirs, text_data, "llama", "plan=prefix->full")
    assert cfg.model.family == "llama"
    assert cfg.prefix.lengths == {"language_model": 8}
    assert cfg.stages[1].train == ["prefix", "language_model"]  # full = the language model (B.5: not embeddings)
    cfg = _lm_recipe(lm_dirs, text_data, "opt", "plan=lora")
    assert cfg.lora.targets == {"language_model": ["q_proj", "v_proj"]}
    explicit = _lm_recipe(lm_dirs, text_data, "opt", "plan=lora", "lora.targets.language_model=[k_proj]")
    assert explicit.lora.targets == {"language_model": ["k_proj"]}


@pytest.mark.parametrize("override,message", [
    (("plan=null", "stages=[{train: [qformer], steps: 1}]"), "the opt model has no 'qformer' parameters"),
    (("plan=null", "stages=[{train: [adapter], steps: 1}]"), "the opt model has no 'adapter' parameters"),
    (("data.name=synthetic",), "data.name: synthetic is image data, but model.family opt is a language model"),
])
def test_language_model_recipe_mistakes(lm_dirs, text_data, override, message):
    with pytest.raises(RecipeError, match=message):
        _lm_recipe(lm_dirs, text_data, "opt", *override)


def test_text_data_needs_a_language_model(text_data):
    with pytest.raises(RecipeError, match="data.name: text trains a language model, but the model is blip2"):
        load_recipe(None, ["data.name=text", f"data.train_file={text_data[0]}", f"data.eval_file={text_data[1]}"])


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_standalone_lm_parameter_groups(lm_dirs, family):
    from ptscale.models.backbone import load_backbone

    cfg = FAMILIES[family]
    model = PrefixTunedModel(load_backbone(lm_dirs[family], family=family).model,
                             load_recipe().prefix.__class__(lengths=cfg.prefix_lengths))
    from ptscale.config import LoraConfig

    inject_lora(model, LoraConfig(targets=cfg.lora_targets))
    names = [n for n, _ in model.named_parameters()]
    groups = {n: group_of(n) for n in names}
    assert set(groups.values()) <= set(cfg.groups)
    sizes = group_sizes(model)
    for g in ("prefix", "lora", "embeddings", "language_model"):
        assert sizes[g] > 0, g
    assert all(".q_proj." in n or ".v_proj." in n for n in names if groups[n] == "lora")
    embeddings = {n for n, g in groups.items() if g == "embeddings"}
    assert embeddings == ({"base.model.decoder.embed_tokens.weight", "base.model.decoder.embed_positions.weight"}
                          if family == "opt" else {"base.model.embed_tokens.weight"})
    # OPT ties its LM head to the word embeddings (one parameter); the tiny Llama does not
    assert (sizes["lm_head"] > 0) == (family == "llama")


def test_text_default_preset_is_a_llama_and_a_family_must_fit_it():
    cfg = load_recipe("ptscale/recipes/text-default.yaml")
    assert (cfg.model.family, cfg.data.name, cfg.prefix.lengths) == ("llama", "synthetic-text", {"language_model": 8})
    with pytest.raises(RecipeError, match="model.family=opt, but preset tiny-llama-text is a llama model"):
        load_recipe("ptscale/recipes/text-default.yaml", ["model.family=opt"])
    with pytest.raises(RecipeError, match="model.pretrain_steps: 0"):
        load_recipe("ptscale/recipes/text-default.yaml", ["model.pretrain_steps=0"])
