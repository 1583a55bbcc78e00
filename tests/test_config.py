import pytest

from ptscale.config import RecipeError, load_recipe


def test_embedded_default_loads():
    cfg = load_recipe()
    assert [s.train for s in cfg.stages] == [["prefix"], ["prefix", "lora"]]
    assert cfg.prefix.lengths == {"qformer": 8, "language_model": 8}
    assert cfg.lora.r == 16 and cfg.lora.alpha == 32 and cfg.lora.dropout == 0.05


def test_overrides_apply_with_types():
    cfg = load_recipe(overrides=["methods.prefix.lr=1e-4", "data.train_size=32", "prefix.lengths.qformer=0",
                                 "eval.num_beams=1"])
    assert cfg.stages[0].lr == 1e-4 and isinstance(cfg.stages[0].lr, float)
    assert cfg.data.train_size == 32 and cfg.prefix.lengths["qformer"] == 0 and cfg.eval.num_beams == 1


@pytest.mark.parametrize("override, key", [
    ("model.colour=red", "model.colour"),
    ("methods.prefix.learning_rate=1", "methods.prefix.learning_rate"),
    ("data.train_size=many", "data.train_size"),
    ("model.dtype=fp8", "model.dtype"),
    ("plan=prefix->wings", "plan: 'prefix->wings' names unknown method 'wings'"),
    ("plan=prefix->lora->full", "plan: 'prefix->lora->full' chains more than two methods"),
    ("methods.lora=null", "methods.lora"),
    ("prefix.lengths.vision_tower=4", "prefix.lengths.vision_tower"),
    ("methods.prefix.batch_size=0", "stages.0.batch_size"),
    ("data.eval_size=0", "data.eval_size"),
    ("stages.5.lr=1", "stages.5.lr"),
    ("model.dtype.x=1", "model.dtype.x"),
    ("methods.lora.warmup_ratio=1.5", "stages.1.warmup_ratio"),
    ("model.gradient_checkpointing=1", "model.gradient_checkpointing"),
])
def test_bad_recipes_name_the_key(override, key):
    with pytest.raises(RecipeError) as e:
        load_recipe(overrides=[override])
    assert key in str(e.value)  # the whole dotted key (or the plan's words), not just its last part


def test_training_prefix_without_prefix_is_impossible():
    with pytest.raises(RecipeError, match="stages.0.train: trains 'prefix' but every prefix.lengths is 0"):
        load_recipe(overrides=["prefix.lengths.qformer=0", "prefix.lengths.language_model=0"])


def test_explicit_stages_and_unknown_groups(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("stages:\n  - train: [prefix, wings]\n")
    with pytest.raises(RecipeError, match="stages.0.train: unknown parameter group 'wings'"):
        load_recipe(path)
    path.write_text("stages:\n  - train: [prefix]\n  - train: []\n")
    with pytest.raises(RecipeError, match="stages.1.train: empty stage"):
        load_recipe(path)
    path.write_text("plan: prefix\nmethods: {prefix: {lr: 1.0e-3}}\nstages:\n  - train: [prefix]\n")
    with pytest.raises(RecipeError, match="plan and stages"):
        load_recipe(path)
    path.write_text("stages:\n  - train: [full]\n")
    assert load_recipe(path).stages[0].train == ["vision", "qformer", "projection", "language_model"]


def test_recipe_file_and_missing_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("stages:\n  - train: [lora]\n    steps: 3\n")
    cfg = load_recipe(path)
    assert len(cfg.stages) == 1 and cfg.stages[0].steps == 3
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    path.write_text("stages: []\n")
    with pytest.raises(RecipeError, match="no stages"):
        load_recipe(path)


@pytest.mark.parametrize("plan, trains", [
    ("prefix", [["prefix"]]),
    ("lora", [["lora"]]),
    ("prefix->lora", [["prefix"], ["prefix", "lora"]]),
    ("lora->prefix", [["lora"], ["lora", "prefix"]]),
    ("prefix+lora", [["prefix", "lora"]]),
    ("alternate(prefix,lora,2)", [["prefix"], ["lora"], ["prefix"], ["lora"]]),
])
def test_named_plans(plan, trains):
    cfg = load_recipe(overrides=[f"plan={plan}"])
    assert [s.train for s in cfg.stages] == trains


@pytest.mark.parametrize("preset, towers", [("tiny-vinvl", "bert"),
                                            ("tiny-blip", "vision, text_encoder, text_decoder")])
def test_adapters_in_a_tower_the_model_lacks_are_refused_naming_its_towers(preset, towers):
    """adapter.components names a tower of the model's own family (was: an AttributeError traceback at build)."""
    with pytest.raises(RecipeError, match=f"adapter.components: .* has no 'qformer'; its components: {towers}$"):
        load_recipe(None, [f"model.preset={preset}", "plan=prefix->adapter", "adapter.components=[qformer]",
                           "adapter.budget=1000"])
