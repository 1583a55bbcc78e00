"""The prefix section of a recipe: the new switches load, impossible combinations name their key."""

import pytest

from ptscale.config import RecipeError, load_recipe


def test_prefix_switches_load():
    cfg = load_recipe(overrides=["prefix.kind=plus", "prefix.encoder=linear", "prefix.feature_map=relu",
                                 "prefix.type_embedding=false", "prefix.lengths.encoder=4",
                                 "prefix.lengths.decoder=2"])
    p = cfg.prefix
    assert (p.kind, p.encoder, p.feature_map, p.type_embedding) == ("plus", "linear", "relu", False)
    assert p.lengths == {"qformer": 8, "language_model": 8, "encoder": 4, "decoder": 2}


@pytest.mark.parametrize("override, message", [
    ("prefix.kind=suffix", "prefix.kind: 'suffix' is not one of 'classic', 'plus'"),
    ("prefix.encoder=conv", "prefix.encoder: 'conv' is not one of 'mlp', 'linear', 'none'"),
    ("prefix.feature_map=softmax", "prefix.feature_map: 'softmax' is not one of"),
    ("prefix.feature_map=relu", "prefix.feature_map: only used by prefix.kind=plus"),
    ("prefix.encoder_hidden=0", "prefix.encoder_hidden: must be > 0 for the mlp encoder"),
    ("prefix.init_std=-1", "prefix.init_std: must be >= 0"),
    ("prefix.lengths.text=4", "prefix.lengths.text: unknown target; known: qformer, vision, language_model, "
                              "encoder, decoder"),
])
def test_bad_prefix_settings_name_the_key(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(overrides=[override])
