"""``ptscale analyze``: spectra of the vision / Q-Former / text paths of saved runs against the pre-trained
backbone (PT-PEFT §2.3), and the pieces it is built from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from ptscale.analysis.analyze import PATHS, AnalyzeRequest, analyze_runs, last_layer_features, update_masked
from ptscale.analysis.effective_rank import SpectrumAccumulator
from tests.runs_fixture import analysed_runs  # noqa: F401


def _models(document: dict) -> dict[str, dict]:
    return {m["name"]: m for m in document["models"]}


def test_two_runs_against_the_pretrained_backbone(analysed_runs):  # noqa: F811
    runs, out = analysed_runs
    document = json.loads((out / "analysis.json").read_text())
    models = _models(document)
    assert list(models) == ["pre-trained", "a", "b"]
    assert [m["role"] for m in document["models"]] == ["reference", "run", "run"]
    # run a's eval split: the suite's test, generalisation and retention groups of data.eval_size=16 each
    assert document["data"]["size"] == 3 * 16 and document["threshold"] == 0.9
    for name, model in models.items():
        for path in PATHS:
            entry = model["paths"][path]
            assert 0.0 < entry["fraction"] <= 1.0
            assert entry["fraction"] == entry["effective_rank"] / entry["length"]
            assert sum(entry["spectrum"]) == pytest.approx(1.0, abs=1e-9)
            assert entry["cumulative"][-1] == pytest.approx(1.0, abs=1e-9)
            assert entry["spectrum"] == sorted(entry["spectrum"], reverse=True)
            if name == "pre-trained":
                assert entry["percent_of_reference"] == 100.0
            assert entry["percent_of_reference"] == pytest.approx(
                100 * entry["fraction"] / models["pre-trained"]["paths"][path]["fraction"])
    # Tiny ViT: 36 patches + CLS, hidden 64; Q-Former: 32 queries. The vision encoder is frozen and carries
    # no prefix or tuner in either plan, so its spectrum is the pre-trained one; the Q-Former and the
    # language model get prefixes, so their spectra move.
    ref = models["pre-trained"]["paths"]
    assert ref["vision"]["length"] == 37 and ref["qformer"]["length"] == 32
    for name in ("a", "b"):
        mine = models[name]["paths"]
        assert mine["vision"]["spectrum"] == pytest.approx(ref["vision"]["spectrum"], abs=1e-6)
        for path in ("qformer", "text"):
            assert mine[path]["spectrum"] != pytest.approx(ref[path]["spectrum"], abs=1e-6)
        assert models[name]["run_dir"] == str(getattr(runs, name))
    # Each run keeps its own file (reference + itself) for `ptscale report`.
    for run in runs.all:
        own = json.loads((run / "analysis.json").read_text())
        assert [m["name"] for m in own["models"]] == ["pre-trained", run.name]
        assert own["models"][1] == models[run.name]


def test_spectrum_plots_are_print_sized_pngs_with_pdfs_and_plan_labels(analysed_runs):  # noqa: F811
    runs, out = analysed_runs
    for path in PATHS:
        png = out / f"spectrum_{path}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"  # vector copy for a paper
        with Image.open(png) as image:
            width, height = image.size
            assert width >= 1400 and height >= 700  # 8 x 4 in at 200 dpi, plus the legend right of the axes
            # Not a blank canvas: the curves and legend put many distinct colours on it.
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 20
    # Legends name the plan and where the trained parameters sit, not the directory
    models = _models(json.loads((out / "analysis.json").read_text()))
    assert models["pre-trained"]["label"] == "pre-trained backbone"
    assert models[runs.a.name]["label"] == ("prefix->lora (prefix Q-Former 8, LM 8; LoRA r16 Q-Former query/key/value; "
                                            "LoRA r16 LM q_proj/k_proj/v_proj)")
    assert models[runs.b.name]["label"] == "prefix (prefix Q-Former 8, LM 8)"


def test_reference_can_be_another_run(analysed_runs, tmp_path):  # noqa: F811
    runs, _ = analysed_runs
    copies = [Path(shutil.copytree(r, tmp_path / r.name)) for r in runs.all]  # keep the shared runs' files
    document = analyze_runs(AnalyzeRequest(run_dirs=copies, reference=str(copies[1]), samples=6, batch_size=4,
                                           out_dir=tmp_path / "out"))
    models = _models(document)
    assert list(models) == ["reference: b", "a", "b"]
    assert document["data"]["size"] == 3 * 6  # --samples: per group of the suite
    for path in PATHS:
        assert models["b"]["paths"][path]["percent_of_reference"] == 100.0
        assert models["b"]["paths"][path]["spectrum"] == pytest.approx(
            models["reference: b"]["paths"][path]["spectrum"], abs=1e-12)


def test_several_runs_need_an_output_directory(analysed_runs):  # noqa: F811
    runs, _ = analysed_runs
    with pytest.raises(ValueError, match="give --out"):
        analyze_runs(AnalyzeRequest(run_dirs=runs.all))


def test_grouped_masked_update_equals_per_sample_svds():
    torch.manual_seed(0)
    features = torch.randn(6, 9, 5)
    lengths = [9, 4, 4, 7, 1, 4]
    mask = torch.zeros(6, 9, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, 9 - n:] = True  # left padding: the kept rows need not start at 0
    grouped, per_sample = SpectrumAccumulator(), SpectrumAccumulator()
    update_masked(grouped, features, mask)
    per_sample.update(features, mask)  # the accumulator's own loop, one SVD per sample
    assert grouped.count == per_sample.count == 6
    assert torch.allclose(grouped.compute(), per_sample.compute(), atol=1e-12)
    with pytest.raises(ValueError, match="no unmasked tokens"):
        update_masked(SpectrumAccumulator(), features, torch.zeros(6, 9, dtype=torch.bool))


def test_features_are_the_last_layers(tiny_backbone):
    """The text features feed the LM head (they are its last hidden state), cover BOS + the record's task prompt +
    caption + EOS only (no image or padding positions),
    and the vision / Q-Former features are those modules' outputs."""
    from ptscale.data.collate import CaptionCollator
    from ptscale.data.synthetic import make_split

    model, tokenizer, processor = tiny_backbone
    collator = CaptionCollator(processor, tokenizer, model.config.num_query_tokens, model.config.image_token_id)
    records = make_split("downstream", 3, 0, "eval")
    full = collator.train_batch(records)
    batch = {k: full[k] for k in ("pixel_values", "input_ids", "attention_mask")}
    feats = last_layer_features(model, batch, model.config.image_token_id)
    text, mask = feats["text"]
    with torch.no_grad():
        logits = model(**batch).logits
        vision = model.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state
    assert torch.allclose(model.language_model.lm_head(text), logits, atol=1e-5)
    assert torch.allclose(feats["vision"][0], vision, atol=1e-6) and feats["vision"][1] is None
    assert feats["qformer"][0].shape == (3, model.config.num_query_tokens, model.config.qformer_config.hidden_size)
    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    assert all(r.get("prompt") for r in records)  # the downstream task is asked for by its own prompt
    expected = [n_tokens(r["prompt"]) + n_tokens(r["target"]) + 2 for r in records]  # + BOS + EOS
    assert mask.sum(dim=1).tolist() == expected
