"""Round trips of standalone language-model runs (tiny OPT and Llama, prefix-tuned a few steps) through every
export, each loaded the documented way; and the README's plain-transformers snippet (pre-filled DynamicCache)
on a BLIP-2 model whose only prefix is the language model's.

Logits: <= 1e-5 (fp32; the export paths recompute the same attention in another order: a pre-filled cache or
a folded prefix instead of the encoder). Tokens: exactly equal, greedy and beam search.
"""

import re
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM

import ptscale
from ptscale.config import PrefixConfig
from ptscale.prefix.model import PrefixTunedModel
from ptscale.tuners.export import (
    LM_PREFIX_FILE,
    WITH_PREFIXES_DIR,
    export_lm_prefix_peft,
    export_merged,
    read_manifest,
)
from tests.prefix.families import build, make_batch

TOL = dict(rtol=1e-5, atol=1e-5)
README = Path(__file__).resolve().parents[2] / "README.md"


def _trained(family, tmp_path, positions="shift"):
    """A base saved to disk (the run's model.path) and a prefix-tuned model trained a few Adam steps."""
    base = build(family)
    base.save_pretrained(tmp_path / "base")
    model = PrefixTunedModel(base, PrefixConfig(lengths={"language_model": 4}, encoder_hidden=16,
                                                positions=positions))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    batch = make_batch(family)
    for _ in range(5):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    return model.eval()


def _inputs(family):
    batch = make_batch(family, seed=4)  # left-padded row 1
    batch.pop("labels")
    return batch


def _same_outputs(a, b, batch):
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(a(**batch).logits[real], b(**batch).logits[real], **TOL)
        for beams in (1, 3):
            kw = dict(max_new_tokens=8, do_sample=False, num_beams=beams)
            assert torch.equal(a.generate(**batch, **kw), b.generate(**batch, **kw)), f"num_beams={beams}"


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_standalone_lm_round_trips(family, tmp_path):
    model = _trained(family, tmp_path)
    batch = _inputs(family)
    with torch.no_grad(), model.prefixes_disabled():  # training moved the model: the checks below can fail
        assert (model(**batch).logits - PrefixTunedModel(build(family), PrefixConfig(lengths={}))(**batch).logits
                ).abs().max() == 0
    with torch.no_grad():
        assert (model(**batch).logits - build(family)(**batch).logits).abs().max() > 1e-3

    export_merged(model, tmp_path / "merged", base_model_name_or_path=tmp_path / "base")
    assert read_manifest(tmp_path / "merged")["reproduces_trained_model"]["transformers+DynamicCache"]
    _same_outputs(ptscale.from_pretrained(tmp_path / "merged"), model, batch)

    export_lm_prefix_peft(model, tmp_path / "peft", base_model_name_or_path=tmp_path / "base")
    manifest = read_manifest(tmp_path / "peft")
    assert manifest["warnings"] == [] and manifest["reproduces_trained_model"]["peft.PeftModel.from_pretrained"]
    _same_outputs(ptscale.from_pretrained(tmp_path / "peft"), model, batch)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "peft")
    _same_outputs(peft.eval(), model, batch)
    # base_model_name_or_path is recorded: AutoPeftModel finds the base by itself
    _same_outputs(AutoPeftModelForCausalLM.from_pretrained(tmp_path / "peft").eval(), model, batch)


def test_keep_positions_export_says_peft_does_not_reproduce_it(tmp_path):
    model = _trained("opt", tmp_path, positions="keep")
    export_lm_prefix_peft(model, tmp_path / "peft", base_model_name_or_path=tmp_path / "base")
    manifest = read_manifest(tmp_path / "peft")
    assert manifest["warnings"] and any("positions=keep" in x for x in manifest["not_included"])
    # ptscale's own loader keeps the convention: exact round trip all the same
    export_merged(model, tmp_path / "merged")
    _same_outputs(ptscale.from_pretrained(tmp_path / "merged"), model, _inputs("opt"))


def _readme_snippet() -> str:
    text = README.read_text()
    found = re.search(r"```python\n(# plain transformers \+ DynamicCache.*?)```", text, re.S)
    assert found, "README: the plain-transformers snippet is missing"
    return found.group(1)


def test_readme_dynamic_cache_snippet_reproduces_the_trained_blip2(tiny_backbone, tmp_path):
    """A BLIP-2 run whose Q-Former prefix is empty needs no ptscale at inference."""
    base, tok, proc = tiny_backbone
    model = PrefixTunedModel(base, PrefixConfig(lengths={"qformer": 0, "language_model": 4}, encoder_hidden=16,
                                                init_std=0.5)).eval()
    export_merged(model, tmp_path / "merged", tokenizer=tok, image_processor=proc)
    assert (tmp_path / "merged" / LM_PREFIX_FILE).is_file() and (tmp_path / "merged" / WITH_PREFIXES_DIR).is_dir()
    ns: dict = {}
    snippet = _readme_snippet().replace('export = "merged"', f'export = "{tmp_path / "merged"}"')
    exec(compile(snippet, "README.md", "exec"), ns)  # noqa: S102 - the documented code, run as written
    pixels, ids = ns["pixel_values"], ns["ids"]
    mask = torch.ones_like(ids)
    expected = model.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, max_new_tokens=20)
    assert torch.equal(ns["out"], expected)
    with torch.no_grad(), model.prefixes_disabled():  # and the prefix matters for this output
        without = model.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, max_new_tokens=20)
    assert not torch.equal(without, expected)
    # logits of the same route
    plain, cache = ns["model"], ns["prefix_cache"](1)
    with torch.no_grad():
        ours = model(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits
        theirs = plain(pixel_values=pixels, input_ids=ids, attention_mask=ns["mask"], past_key_values=cache).logits
    torch.testing.assert_close(theirs, ours, **TOL)


def test_exported_base_is_the_untouched_standalone_base(tmp_path):
    """The merged export of a prefix-only standalone run holds the base weights unchanged (nothing merged)."""
    model = _trained("llama", tmp_path)
    export_merged(model, tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / WITH_PREFIXES_DIR)
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    for (n, a), (_, b) in zip(reloaded.state_dict().items(), original.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
