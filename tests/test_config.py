import pytest

from ptscale.config import RecipeError, load_recipe


def test_embedded_default_loads():
    cfg = load_recipe()
    assert [s.train for s in cfg.stages] == [["prefix"], ["prefix", "lora"]]
    assert cfg.prefix.lengths == {"qformer": 8, "language_model": 8}
    assert cfg.lora.r == 16 and cfg.lora.alpha == 32 and cfg.lora.dropout == 0.05


def test_overrides_apply_with_types():
    cfg = load_recipe(overrides=["stages.0.lr=1e-4", "data.train_size=32", "prefix.lengths.qformer=0",
                                 "eval.num_beams=1"])
    assert cfg.stages[0].lr == 1e-4 and isinstance(cfg.stages[0].lr, float)
    assert cfg.data.train_size == 32 and cfg.prefix.lengths["qformer"] == 0 and cfg.eval.num_beams == 1


@pytest.mark.parametrize("override, key", [
    ("model.colour=red", "model.colour"),
    ("stages.0.learning_rate=1", "stages.0.learning_rate"),
    ("data.train_size=many", "data.train_size"),
    ("model.dtype=fp8", "model.dtype"),
    ("stages.0.train=[prefix, adapterz]", "stages.0.train"),
    ("stages.1.train=[]", "stages.1.train"),
    ("prefix.lengths.vision_tower=4", "prefix.lengths.vision_tower"),
    ("stages.0.batch_size=0", "stages.0.batch_size"),
    ("data.eval_size=0", "data.eval_size"),
    ("stages.5.lr=1", "stages.5.lr"),
    ("stages.0.warmup_ratio=1.5", "stages.0.warmup_ratio"),
    ("model.gradient_checkpointing=1", "model.gradient_checkpointing"),
])
def test_bad_recipes_name_the_key(override, key):
    with pytest.raises(RecipeError, match=key.split(".")[-1]):
        load_recipe(overrides=[override])


def test_training_prefix_without_prefix_is_impossible():
    with pytest.raises(RecipeError, match="stages.0.train: trains 'prefix' but every prefix.lengths is 0"):
        load_recipe(overrides=["prefix.lengths.qformer=0", "prefix.lengths.language_model=0"])


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
