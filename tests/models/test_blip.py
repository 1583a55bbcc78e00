"""BLIP by recipe: the tiny preset's config, ``model.path`` for a local BLIP captioning checkpoint (a tiny
``save_pretrained`` directory with its tokenizer and image processor), the one-line refusals, BLIP's parameter
groups (``full`` like BLIP-2's: word embeddings and the LM head frozen), LoRA and adapter sites in its text
decoder, and generation through the recipe's generation path."""

import re

import pytest

from ptscale.config import DataConfig, EvalConfig, LoraConfig, ModelConfig, PrefixConfig, load_recipe
from ptscale.data.blip_collate import IGNORE, BlipCaptionCollator, BlipVQACollator
from ptscale.data.collate import make_collator
from ptscale.errors import RecipeError
from ptscale.eval.generate import generate_captions
from ptscale.models.backbone import default_backbone_dir, load_backbone, resolve_source
from ptscale.models.blip import model_class, new_tiny_blip, tiny_processor
from ptscale.models.families import FAMILIES
from ptscale.models.groups import expand_groups, group_of, set_trainable
from ptscale.prefix.model import PrefixTunedModel
from ptscale.prefix.wrapper import PrefixAttentionWrapper
from ptscale.tuners.adapter.model import adapter_sites
from ptscale.tuners.lora import inject_lora


def _save(path, task="captioning"):
    model, tokenizer = new_tiny_blip("tiny-blip", task, seed=0)
    for thing in (model, tokenizer, tiny_processor("tiny-blip")):
        thing.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("blip"))


def test_model_path_resolves_and_loads_a_blip_captioning_checkpoint(blip_dir):
    source = resolve_source(ModelConfig(path=str(blip_dir)))
    assert source.config.model_type == "blip" and source.identity["digest"]
    backbone = load_backbone(blip_dir)
    assert type(backbone.model) is model_class("captioning")
    collator = make_collator(source, load_recipe().data)
    assert isinstance(collator, BlipCaptionCollator)
    text = source.config.text_config
    assert (collator.bos, collator.sep, collator.pad) == (text.bos_token_id, text.sep_token_id, text.pad_token_id)


def test_a_blip_vqa_checkpoint_trains_on_vqa_data_only(tmp_path):
    source = resolve_source(ModelConfig(path=str(_save(tmp_path, "vqa"))))
    assert isinstance(make_collator(source, DataConfig(name="vqav2")), BlipVQACollator)
    with pytest.raises(RecipeError, match=r"data.name=synthetic with a BLIP VQA backbone \(BlipForQuestionAnswering\)"):
        make_collator(source, DataConfig())


def test_another_blip_architecture_is_refused_in_one_line(tmp_path):
    from transformers import BlipModel

    model, tokenizer = new_tiny_blip("tiny-blip", seed=0)
    BlipModel(model.config).save_pretrained(tmp_path)
    for thing in (tokenizer, tiny_processor("tiny-blip")):
        thing.save_pretrained(tmp_path)
    with pytest.raises(RecipeError, match=r"a BLIP checkpoint of architecture 'BlipModel'; ptscale trains "
                                          r"BlipForConditionalGeneration, BlipForQuestionAnswering"):
        resolve_source(ModelConfig(path=str(tmp_path)))


@pytest.mark.parametrize("key, message", [
    ("model.pretrain_steps=0", "0 (random weights) is not offered for the BLIP preset tiny-blip"),
    ("model.quantization=nf4", "not offered for the BLIP preset tiny-blip"),
])
def test_blip_preset_refusals(key, message):
    cfg = load_recipe(None, ["model.preset=tiny-blip", key, "plan=prefix->lora", "prefix.lengths={decoder: 4}",
                             "lora.targets={text_decoder: [attention.self.query]}"])
    with pytest.raises(RecipeError, match=re.escape(message)):
        resolve_source(cfg.model, build=False)


def test_tiny_blip_default_is_content_addressed_beside_blip2():
    blip = default_backbone_dir(ModelConfig(preset="tiny-blip"))
    assert blip.name.startswith("tiny-blip-") and blip != default_backbone_dir(ModelConfig())
    assert blip != default_backbone_dir(ModelConfig(preset="tiny-blip", pretrain_steps=10))


def test_dry_run_source_of_an_uncached_default(monkeypatch, tmp_path):
    monkeypatch.setenv("PTSCALE_CACHE", str(tmp_path))  # nothing cached: described, not pre-trained
    source = resolve_source(ModelConfig(preset="tiny-blip"), build=False)
    assert source.path is None and source.config.model_type == "blip" and "not pre-trained yet" in \
        source.identity["source"]
    assert not any(tmp_path.iterdir())


def test_every_blip_parameter_has_one_group_and_full_keeps_embeddings_and_head_frozen():
    model = PrefixTunedModel(new_tiny_blip("tiny-blip", "vqa", seed=0)[0],
                             PrefixConfig(lengths={"vision": 2, "encoder": 2, "decoder": 2}, encoder_hidden=8))
    groups = {n: group_of(n) for n, _ in model.named_parameters()}
    assert set(groups.values()) == {"prefix", "embeddings", "lm_head", "vision", "text_encoder", "text_decoder"}
    assert groups["base.text_decoder.bert.embeddings.word_embeddings.weight"] == "embeddings"
    assert groups["base.text_encoder.embeddings.position_embeddings.weight"] == "embeddings"
    assert groups["base.text_decoder.bert.encoder.layer.0.attention.self.query.weight"] == "text_decoder"
    assert groups["base.text_decoder.cls.predictions.transform.dense.weight"] == "lm_head"  # the prediction head
    set_trainable(model, expand_groups(["full"], {"full": FAMILIES["blip"].full}))
    on = {groups[n] for n, p in model.named_parameters() if p.requires_grad}
    assert on == {"vision", "text_encoder", "text_decoder"}
    cfg = load_recipe(None, ["model.preset=tiny-blip", "plan=prefix->full", "prefix.lengths={decoder: 4}"])
    assert [s.train for s in cfg.stages] == [["prefix"], ["prefix", "vision", "text_encoder", "text_decoder"]]


def test_lora_and_adapters_reach_the_blip_text_decoder():
    model = PrefixTunedModel(new_tiny_blip("tiny-blip", seed=0)[0], PrefixConfig(lengths={"decoder": 2}))
    targets = inject_lora(model, LoraConfig(targets={"text_decoder": ["attention.self.query",
                                                                      "attention.self.value"]}))
    assert len(targets) == 4 and not any("crossattention" in t for t in targets)
    # LoRA replaced the Linear inside the prefix wrapper, which reads its submodules at call time
    wrapper = model.base.text_decoder.bert.encoder.layer[0].attention.self
    assert isinstance(wrapper, PrefixAttentionWrapper) and hasattr(wrapper.query, "lora_A")
    assert {group_of(n) for n, _ in model.named_parameters() if ".lora_" in n} == {"lora"}
    sites = adapter_sites(model, ["text_decoder"], "sequential")
    assert [s.name for s in sites][:2] == ["base.text_decoder.bert.encoder.layer.0.attention.output.dense",
                                           "base.text_decoder.bert.encoder.layer.0.output.dense"]


def test_lora_on_a_tower_blip_lacks_names_the_towers_it_has():
    model = PrefixTunedModel(new_tiny_blip("tiny-blip", seed=0)[0], PrefixConfig(lengths={"decoder": 2}))
    with pytest.raises(ValueError, match="lora.targets.qformer: a blip model has no qformer; its components: "
                                         "vision, text_decoder$"):
        inject_lora(model, LoraConfig(targets={"qformer": ["query"]}))


def test_generation_path_decodes_only_new_tokens(blip_dir):
    from ptscale.data.synthetic import make_split

    source = resolve_source(ModelConfig(path=str(blip_dir)))
    backbone = load_backbone(blip_dir)
    collator = make_collator(source, load_recipe(None, ["data.prompt=a"]).data)
    # BLIP captioning takes data.prompt for the whole batch: the records' own task prompts are dropped (as the
    # data sources do for this collator)
    records = [{k: v for k, v in r.items() if k != "prompt"} for r in make_split("downstream", 3, 0, "test")]
    batch = collator.generation_batch(records)
    prompt = collator.tokenizer("a", add_special_tokens=False)["input_ids"]
    assert batch["input_ids"].tolist() == [[collator.bos, *prompt, collator.sep]] * 3
    model = PrefixTunedModel(backbone.model, PrefixConfig(lengths={"decoder": 2}, encoder_hidden=8))
    out = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, num_beams=1)
    assert out[:, :1 + len(prompt)].tolist() == [[collator.bos, *prompt]] * 3  # BLIP returns the prompt first
    assert collator.generated(out, batch).shape[1] == 3
    texts = generate_captions(model, collator, records, EvalConfig(num_beams=1, max_new_tokens=3, min_new_tokens=3))
    expected = collator.tokenizer.batch_decode(out[:, 1 + len(prompt):], skip_special_tokens=True)
    assert texts == {r["image_id"]: e.strip() for r, e in zip(records, expected, strict=True)}


def test_vqa_batches_train_and_answer_through_the_generation_path(tmp_path):
    """BlipForQuestionAnswering with prefixes in its question encoder and answer decoder: the VQA batch trains
    (every prefix gets a gradient) and generate_captions decodes the answers only, keyed by question id."""
    from ptscale.data.synthetic import make_split

    path = _save(tmp_path, "vqa")
    source = resolve_source(ModelConfig(path=str(path)))
    collator = make_collator(source, DataConfig(name="vqav2"))
    records = [{**r, "question_id": i, "question": "what shape is it", "target": "circle"}
               for i, r in enumerate(make_split("downstream", 2, 0, "test"))]
    batch = collator.train_batch(records)
    question = collator.tokenizer("what shape is it")["input_ids"]
    circle = collator.tokenizer("circle", add_special_tokens=False)["input_ids"]
    assert batch["input_ids"].tolist() == [question] * 2
    assert batch["decoder_input_ids"].tolist() == [[collator.bos, *circle, collator.sep]] * 2
    assert batch["labels"].tolist() == [[IGNORE, *circle, collator.sep]] * 2
    model = PrefixTunedModel(load_backbone(path).model, PrefixConfig(lengths={"encoder": 2, "decoder": 2},
                                                                     encoder_hidden=8))
    batch.pop("image_keys")
    model(**batch).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.prefixes.parameters())
    answers = generate_captions(model, collator, records, EvalConfig(num_beams=1, max_new_tokens=2, min_new_tokens=2))
    gen = collator.generation_batch(records)
    out = model.generate(**gen, max_new_tokens=2, min_new_tokens=2, num_beams=1)
    expected = collator.tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)
    assert answers == {str(i): e.strip() for i, e in enumerate(expected)}


def test_the_blip_family_brings_its_own_prefix_and_lora_defaults():
    cfg = load_recipe(None, ["model.preset=tiny-blip", "plan=prefix->lora"])
    assert cfg.model.family == "blip"
    assert cfg.prefix.lengths == {"decoder": 8}
    assert cfg.lora.targets == {"text_decoder": ["attention.self.query", "attention.self.value"]}
    # an override of one target keeps none of BLIP-2's default entries (no Q-Former in BLIP)
    cfg = load_recipe(None, ["model.preset=tiny-blip", "plan=prefix->lora", "prefix.lengths.vision=2"])
    assert cfg.prefix.lengths == {"vision": 2}
    with pytest.raises(RecipeError, match="preset tiny-blip is a blip model and there is no model.path"):
        load_recipe(None, ["model.preset=tiny-blip", "model.family=blip2"])
