"""OFA in ptscale's recipe machinery: the family's defaults, model.path checks through the command line (one line,
exit 2, no run directory), gradient checkpointing, run labels, the analysis refusal and the merged export."""

import json
import shutil

import pytest
import torch

from ptscale.config import PrefixConfig, RecipeError, load_recipe
from ptscale.data.collate import make_collator
from ptscale.data.ofa_collate import OFACollator
from ptscale.models.backbone import resolve_source
from ptscale.models.ofa import OFAModel
from ptscale.prefix.model import PrefixTunedModel
from tests.launch import TRAIN, assert_one_line, cli
from tests.models.test_ofa import NUM_BINS, NUM_CODES, _original, _write_bpe, _write_released
from tests.prefix.ofa_families import build_ofa, ofa_batch, prompt


def test_tiny_ofa_recipe_defaults_and_refusals():
    cfg = load_recipe(None, ["model.preset=tiny-ofa", "plan=prefix->lora"])
    assert cfg.model.family == "ofa" and cfg.prefix.lengths == {"language_model": 8}
    assert cfg.lora.targets == {"language_model": ["q_proj", "v_proj"]}
    source = resolve_source(cfg.model, build=False)
    assert source.family == "ofa" and source.config.image_resolution == 48
    assert isinstance(make_collator(source, cfg.data), OFACollator)
    with pytest.raises(RecipeError, match="not offered for the OFA preset tiny-ofa"):
        resolve_source(load_recipe(None, ["model.preset=tiny-ofa", "model.pretrain_steps=0"]).model, build=False)
    with pytest.raises(RecipeError, match="not offered for the OFA preset"):
        resolve_source(load_recipe(None, ["model.preset=tiny-ofa", "model.quantization=nf4"]).model, build=False)
    with pytest.raises(RecipeError, match="the ofa model has no 'qformer'"):
        load_recipe(None, ["model.preset=tiny-ofa", "plan=prefix->adapter",
                           "adapter={components: [qformer], bottleneck: 4}"])


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A tiny OFA in the released layout (config.json, pytorch_model.bin, vocab.json, merges.txt) whose images are
    64 px (its config says so: a released OFA's config names no resolution, 480 px is assumed)."""
    path = tmp_path_factory.mktemp("ofa-released")
    bpe = _write_bpe(path)
    vocab_size = bpe + NUM_CODES + NUM_BINS
    _write_released(path, _original(vocab_size), vocab_size, image_resolution=64)
    return path


@pytest.mark.slow
def test_model_path_of_a_released_layout_dry_runs_and_its_mistakes_are_one_line(released, tmp_path):
    out = cli(TRAIN, "--dry-run", f"model.path={released}", f"output_dir={tmp_path}", "plan=prefix->lora")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "dry run OK" in out.stdout + out.stderr and "no preprocessor_config.json" in out.stderr

    def broken(name, change):
        bad = tmp_path / name
        shutil.copytree(released, bad)
        change(bad)
        return cli(TRAIN, "--dry-run", f"model.path={bad}", f"output_dir={tmp_path / 'runs'}")

    def no_merges(bad):
        (bad / "merges.txt").unlink()

    def layerdrop(bad):
        cfg = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**cfg, "encoder_layerdrop": 0.1}))

    def too_large(bad):  # 480 px images: 30 x 30 cells, more than the 8 x 8 position table
        cfg = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "image_resolution"}))

    def truncated(bad):  # a copy cut short: torch.save's zip directory (at the end) is missing
        weights = (bad / "pytorch_model.bin").read_bytes()
        (bad / "pytorch_model.bin").write_bytes(weights[: len(weights) // 2])

    assert_one_line(broken("no-merges", no_merges), 2, "merges.txt")
    assert_one_line(broken("truncated", truncated), 3, "pytorch_model.bin: truncated or corrupt weights file")
    assert_one_line(broken("layerdrop", layerdrop), 2, "encoder_layerdrop")
    assert_one_line(broken("too-large", too_large), 2, "image_bucket_size")
    assert not (tmp_path / "runs").exists()  # no run directory for a refused recipe


def test_gradient_checkpointing_gives_the_same_gradients():
    """The layers are transformers' GradientCheckpointingLayers; recomputation re-reads the stored prefixes
    (float64; not bitwise: the recomputed forward may order reductions differently, ~1e-16 relative)."""
    model = PrefixTunedModel(build_ofa(), PrefixConfig(lengths={"language_model": 3}, init_std=0.5),
                             freeze_base=False).train()
    batch = ofa_batch()
    params = list(model.parameters())
    # the image-code generation weights (decoder's image positions, code layer norm) take no part: unused
    grads = torch.autograd.grad(model(**batch).loss, params, allow_unused=True)
    model.base.activation_checkpointing_enable({"use_reentrant": False})
    assert all(layer.gradient_checkpointing for layer in model.base.encoder.layers)
    grads_ckpt = torch.autograd.grad(model(**batch).loss, params, allow_unused=True)
    assert [g is None for g in grads_ckpt] == [g is None for g in grads]
    for a, c in zip(grads, grads_ckpt, strict=True):
        if a is not None:
            torch.testing.assert_close(c, a, rtol=1e-12, atol=1e-14)


def test_ls_targets_marks_the_family_defaults():
    from ptscale.listing import show_targets

    out = show_targets("tiny-ofa", None)
    assert "* self_attn.q_proj" in out and "* self_attn.v_proj" in out and "* cross_attn.q_proj" in out
    assert "* self_attn.k_proj" not in out and "  self_attn.k_proj" in out


def test_run_labels_name_ofa_placements():
    from ptscale.labels import placement

    assert placement(load_recipe(None, ["model.preset=tiny-ofa", "plan=prefix->full"])) == "prefix LM 8; full FT"
    assert placement(load_recipe(None, ["model.preset=tiny-ofa", "plan=prefix->lora"])) == \
        "prefix LM 8; LoRA r16 LM q_proj/v_proj"


def test_analyze_refuses_an_ofa_run_in_one_line(tmp_path):
    from ptscale.analysis.analyze import AnalyzeRequest, analyze_runs
    from ptscale.config import dump_recipe

    (tmp_path / "recipe.yaml").write_text(dump_recipe(load_recipe(None, ["model.preset=tiny-ofa"])))
    with pytest.raises(RecipeError, match=r"is an OFA run; the analysis reads .* OFA's image tokens") as err:
        analyze_runs(AnalyzeRequest([tmp_path]))
    assert "\n" not in str(err.value)


def test_merged_export_reloads_through_ptscale_with_the_same_logits(tmp_path):
    """--merged on a prefixed OFA: ptscale.from_pretrained finds ptscale's own class by name and reproduces the
    trained model; the manifest's plain load line says where the class comes from."""
    from ptscale.hub import from_pretrained
    from ptscale.tuners.export import export_merged, read_manifest

    model = PrefixTunedModel(build_ofa(dtype=torch.float32),
                             PrefixConfig(lengths={"language_model": 3}, encoder_hidden=8, init_std=0.5)).eval()
    batch = ofa_batch(dtype=torch.float32)
    inputs = {**prompt(batch), "decoder_input_ids": batch["decoder_input_ids"]}
    with torch.no_grad():
        trained = model(**inputs).logits
    export_merged(model, tmp_path)
    reloaded = from_pretrained(tmp_path).eval()
    assert isinstance(reloaded.base, OFAModel) and set(reloaded.folded()) == {"language_model"}
    with torch.no_grad():
        # the export folds the prefix encoder into static keys/values: the same float32 sums, reordered
        torch.testing.assert_close(reloaded(**inputs).logits, trained, rtol=1e-5, atol=1e-5)
    line = read_manifest(tmp_path)["load"]["transformers"]
    assert line.startswith("from ptscale.models.ofa import OFAModel; OFAModel.from_pretrained(")
