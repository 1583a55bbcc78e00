"""VinVL (Oscar+) on transformers' BertModel: the Oscar attention mask; prefixes in BERT's self-attention through the
attention-interface hook (length 0 is the base model exactly; the hook equals an explicit concat reference in float64,
forward and gradients, with the Oscar mask and padding); decoding with and without the KV cache (greedy and beam);
the released Oscar/VinVL checkpoint key layout (config.json + pytorch_model.bin); the family, presets and groups."""

import copy
import json

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ptscale.config import DataConfig, ModelConfig, PrefixConfig, load_recipe
from ptscale.data.collate import make_collator
from ptscale.data.synthetic import make_split
from ptscale.data.vinvl_collate import VinVLCollator
from ptscale.errors import RecipeError
from ptscale.models.backbone import load_backbone, resolve_source
from ptscale.models.families import FAMILIES, family_of_checkpoint
from ptscale.models.groups import group_of, set_trainable
from ptscale.models.vinvl import IGNORE, VinVLConfig, VinVLForCaptioning, load_vinvl, new_tiny_vinvl, oscar_mask
from ptscale.prefix.attention import ATTN_IMPLEMENTATION, SLOT_ATTR
from ptscale.prefix.model import PrefixTunedModel
from tests.prefix.blip_families import explicit_wrapped_attention

REFERENCE = "ptscale_test_vinvl_explicit"
VOCAB, PAD, CLS, SEP, MASK = 40, 0, 2, 3, 4


def _explicit(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """softmax(q [pk; k]^T s + [0; mask]) [pv; v], written out per sample and head (no ptscale.prefix.attention)."""
    slot = getattr(module, SLOT_ATTR, None)
    prefix = slot.get() if slot is not None else None
    if prefix is None:
        prefix = (query.new_zeros(query.shape[1], 0, query.shape[3]),) * 2
    return explicit_wrapped_attention(module, query, key, value, prefix, attention_mask, scaling=scaling,
                                      dropout=dropout, causal=False), None


AttentionInterface.register(REFERENCE, _explicit)
AttentionMaskInterface.register(REFERENCE, sdpa_mask)


def tiny_config(**kw) -> VinVLConfig:
    return VinVLConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=64, type_vocab_size=2, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, img_feature_dim=10, max_caption_len=12, pad_token_id=PAD,
                       cls_token_id=CLS, sep_token_id=SEP, mask_token_id=MASK, **kw)


def build(seed=0, dtype=torch.float64, **kw) -> VinVLForCaptioning:
    torch.manual_seed(seed)
    return VinVLForCaptioning(tiny_config(**kw)).to(dtype).eval()


def batch(dtype=torch.float64, seed=1) -> dict:
    """Two samples: the second with caption, tag and region padding; two masked caption tokens each."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (2, 6), generator=g)
    ids[:, 0] = CLS
    mask = torch.ones_like(ids)
    ids[1, 4:], mask[1, 4:] = PAD, 0
    labels = torch.full_like(ids, IGNORE)
    for row, positions in ((0, (2, 5)), (1, (1, 3))):
        for p in positions:
            labels[row, p], ids[row, p] = ids[row, p], MASK
    tags = torch.randint(5, VOCAB, (2, 3), generator=g)
    tag_mask = torch.ones_like(tags)
    tags[1, 2], tag_mask[1, 2] = PAD, 0
    regions = torch.randn(2, 4, 10, generator=g, dtype=dtype)
    region_mask = torch.ones(2, 4, dtype=torch.long)
    region_mask[1, 3] = 0
    return {"input_ids": ids, "attention_mask": mask, "tag_ids": tags, "tag_mask": tag_mask,
            "region_features": regions, "region_mask": region_mask, "labels": labels}


def _without_labels(b: dict) -> dict:
    return {k: v for k, v in b.items() if k != "labels"}


def test_oscar_mask_captions_left_to_right_context_among_itself():
    mask = oscar_mask(torch.tensor([[1, 1, 0]]), torch.tensor([[1, 0, 1]]))[0, 0]
    expected = torch.tensor([
        # caption 0..2      | tag, tag(pad), region
        [1, 0, 0, 1, 0, 1],
        [1, 1, 0, 1, 0, 1],
        [1, 1, 0, 1, 0, 1],  # a padded caption row: still well defined, its output is never read
        [0, 0, 0, 1, 0, 1],  # tags and regions: never the caption
        [0, 0, 0, 1, 0, 1],
        [0, 0, 0, 1, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_the_mask_holds_in_the_model():
    """Tags' and regions' states do not depend on the caption; a caption token's not on later caption tokens."""
    model = build()
    b = _without_labels(batch())
    changed = {**b, "input_ids": b["input_ids"].clone()}
    changed["input_ids"][:, 3] = 7
    with torch.no_grad():
        h, h2 = model(**b).hidden_states, model(**changed).hidden_states
    lc = b["input_ids"].shape[1]
    assert torch.equal(h[:, lc:], h2[:, lc:])  # the context never sees the caption
    assert torch.equal(h[0, :3], h2[0, :3])  # caption tokens before position 3
    assert not torch.allclose(h[0, 3:lc], h2[0, 3:lc])


def test_prefix_length_zero_is_the_base_model():
    base = build()
    reference = copy.deepcopy(base)
    model = PrefixTunedModel(base, PrefixConfig(lengths={"bert": 0}))
    b = _without_labels(batch())
    with torch.no_grad():
        assert torch.equal(model(**b).logits, reference(**b).logits)
    assert len(model.prefixes) == 0 and base.config._attn_implementation == ATTN_IMPLEMENTATION


@pytest.mark.parametrize("kind", ["classic", "plus"])
def test_hook_equals_explicit_concat_reference_float64(kind):
    model = PrefixTunedModel(build(), PrefixConfig(lengths={"bert": 3}, kind=kind, encoder_hidden=8, init_std=0.5),
                             freeze_base=False).to(torch.float64)
    if kind == "plus":  # a fresh gate is 0 (no effect)
        with torch.no_grad():
            model.prefixes["bert"].gate.uniform_(0.5, 1.5)
    b = batch()
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(**_without_labels(b))
    loss = model(**b).loss
    grads = torch.autograd.grad(loss, params)
    model.base.set_attn_implementation(REFERENCE)
    ref = model(**_without_labels(b))
    grads_ref = torch.autograd.grad(model(**b).loss, params)
    with model.prefixes_disabled():
        plain = model(**_without_labels(b)).logits
    real = b["attention_mask"].bool()
    torch.testing.assert_close(out.logits[real], ref.logits[real], rtol=1e-10, atol=1e-12)
    for a, r in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-12)
    prefix_grads = [g for g, (n, _) in zip(grads, [(n, p) for n, p in model.named_parameters() if p.requires_grad],
                                          strict=True) if n.startswith("prefixes.")]
    assert prefix_grads and all(g.abs().sum() > 0 for g in prefix_grads)
    assert (out.logits[real] - plain[real]).abs().max() > 1e-3  # the prefixes matter
    hooked = [m for m in model.base.modules() if hasattr(m, SLOT_ATTR)]
    assert len(hooked) == 2 and all(type(m).__name__ == "BertSelfAttention" for m in hooked)


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("prefix", [0, 3])
def test_generation_with_and_without_cache(beams, prefix):
    """The same captions with the KV cache as with full recomputation at every step (float64: the cached and the
    uncached forwards sum the same scores in another order, so only the last bits may differ)."""
    model = PrefixTunedModel(build(seed=3), PrefixConfig(lengths={"bert": prefix}, init_std=0.5))
    b = batch(seed=4)
    inputs = {"input_ids": b["input_ids"][:, :1], "attention_mask": b["attention_mask"][:, :1],
              **{k: b[k] for k in ("tag_ids", "tag_mask", "region_features", "region_mask")}}
    run = dict(num_beams=beams, max_new_tokens=8, min_new_tokens=2)
    cached = model.generate(**inputs, **run)
    uncached = model.generate(**inputs, **run, use_cache=False)
    assert cached.shape == (2, 8)
    assert torch.equal(cached, uncached)
    synced = model.generate(**inputs, **run, synced_gpus=True)  # every step decoded: the same captions
    assert torch.equal(cached, synced)


def test_greedy_decoding_predicts_the_mask_step_by_step():
    """Greedy decoding = at each step the argmax at a [MASK] appended after the caption so far (uncached forward)."""
    model = build(seed=5)
    b = batch(seed=6)
    ctx = {k: b[k][:1] for k in ("tag_ids", "tag_mask", "region_features", "region_mask")}
    out = model.generate(input_ids=b["input_ids"][:1, :1], attention_mask=b["attention_mask"][:1, :1], **ctx,
                         max_new_tokens=5, min_new_tokens=5)
    seq = [CLS]
    for _ in range(5):
        ids = torch.tensor([seq + [MASK]])
        with torch.no_grad():
            logits = model(ids, torch.ones_like(ids), **ctx).logits[0, -1]
        logits[[SEP, PAD, CLS, MASK]] = float("-inf")  # min_new_tokens; never a special token
        seq.append(int(logits.argmax()))
    assert out[0].tolist() == seq[1:]


# --- the released key layout ----------------------------------------------------------------------------------
def _released_dir(tmp_path, model: VinVLForCaptioning):
    """A directory as VinVL's released checkpoints are: config.json (no model_type, img_feature_dim),
    pytorch_model.bin with bert.* / cls.* keys (the pooler and the pre-training heads included), vocab.txt."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["bert.pooler.dense.weight"] = torch.randn(16, 16)
    state["bert.pooler.dense.bias"] = torch.zeros(16)
    state["cls.seq_relationship.weight"] = torch.randn(2, 16)
    state["bert.embeddings.position_ids"] = torch.arange(64)[None]
    torch.save(state, tmp_path / "pytorch_model.bin")
    cfg = model.config
    (tmp_path / "config.json").write_text(json.dumps({
        "finetuning_task": "image_captioning", "vocab_size": VOCAB, "hidden_size": 16,
        "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64,
        "type_vocab_size": 2, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "img_feature_dim": 10, "img_feature_type": "frcnn", "use_img_layernorm": 1,
        "img_layer_norm_eps": cfg.img_layer_norm_eps, "max_caption_len": 12}))
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    return tmp_path


def test_the_released_key_layout_loads(tmp_path):
    model = build(dtype=torch.float32, use_img_layernorm=True)
    assert {"bert.img_embedding.weight", "bert.LayerNorm.weight", "cls.predictions.bias",
            "cls.predictions.transform.dense.weight", "bert.embeddings.word_embeddings.weight",
            "bert.encoder.layer.0.attention.self.query.weight"} <= set(model.state_dict())
    path = _released_dir(tmp_path, model)
    assert family_of_checkpoint(path) == "vinvl"
    cfg = load_recipe(None, [f"model.path={path}", "plan=prefix->lora"])
    assert cfg.model.family == "vinvl" and cfg.prefix.lengths == {"bert": 8}
    source = resolve_source(ModelConfig(path=str(path)))
    assert source.family == "vinvl" and source.config.img_feature_dim == 10 and source.config.use_img_layernorm
    assert (source.config.cls_token_id, source.config.sep_token_id, source.config.mask_token_id) == (CLS, SEP, MASK)
    backbone = load_backbone(path)
    assert backbone.family == "vinvl" and backbone.image_processor is None
    b = _without_labels(batch(torch.float32))
    with torch.no_grad():
        assert torch.equal(backbone.model(**b).logits, model(**b).logits)
    assert backbone.model.cls.predictions.decoder.weight is backbone.model.bert.embeddings.word_embeddings.weight


def test_a_missing_key_is_refused(tmp_path):
    path = _released_dir(tmp_path, build(dtype=torch.float32, use_img_layernorm=True))
    state = torch.load(path / "pytorch_model.bin", weights_only=True)
    del state["bert.img_embedding.weight"]
    torch.save(state, path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"missing \['bert.img_embedding.weight'\]"):
        load_vinvl(path)


def test_save_pretrained_round_trip(tmp_path):
    model, tokenizer = new_tiny_vinvl("tiny-vinvl", seed=0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_backbone(tmp_path)
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


# --- family, presets, groups, collator ----------------------------------------------------------------------------
def test_family_groups_and_full():
    family = FAMILIES["vinvl"]
    assert family.prefix_targets == ("bert",) and family.full == ("bert", "projection")
    model = PrefixTunedModel(new_tiny_vinvl("tiny-vinvl", seed=0)[0], PrefixConfig(lengths={"bert": 4}))
    groups = {n: group_of(n) for n, _ in model.named_parameters()}
    assert groups["base.bert.img_embedding.weight"] == "projection"
    assert groups["base.bert.embeddings.word_embeddings.weight"] == "embeddings"
    assert groups["base.bert.encoder.layer.0.attention.self.query.weight"] == "bert"
    assert groups["base.cls.predictions.transform.dense.weight"] == "lm_head"
    assert set(groups.values()) == {"prefix", "projection", "embeddings", "bert", "lm_head"}
    trainable, _ = set_trainable(model, ["bert", "projection"])
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if groups[n] in ("bert", "projection"))


def test_tiny_vinvl_recipe_defaults_and_refusals():
    cfg = load_recipe(None, ["model.preset=tiny-vinvl", "plan=prefix->lora"])
    assert cfg.model.family == "vinvl" and cfg.prefix.lengths == {"bert": 8}
    assert cfg.lora.targets == {"bert": ["attention.self.query", "attention.self.value"]}
    source = resolve_source(cfg.model, build=False)
    assert source.family == "vinvl"
    assert isinstance(make_collator(source, cfg.data), VinVLCollator)
    with pytest.raises(RecipeError, match="VinVL captions from the image alone"):
        make_collator(source, DataConfig(prompt="list the objects"))
    with pytest.raises(RecipeError, match="not offered for the VinVL preset tiny-vinvl"):
        resolve_source(load_recipe(None, ["model.preset=tiny-vinvl", "model.pretrain_steps=0"]).model, build=False)
    with pytest.raises(RecipeError, match="region features are VinVL's input"):
        load_recipe(None, ["data.region_features=."])


def test_collator_masks_caption_tokens_as_oscar_does():
    model, tokenizer = new_tiny_vinvl("tiny-vinvl", seed=0)
    collator = VinVLCollator(tokenizer, model.config)
    records = collator.preprocess(make_split("downstream", 16, 0, "train"))
    b = collator.train_batch(records, torch.Generator().manual_seed(0))
    assert b["input_ids"][:, 0].eq(tokenizer.cls_token_id).all()
    picked = b["labels"] != IGNORE
    per_row = picked.sum(1)
    assert per_row.min() >= 1 and per_row.max() <= model.config.max_masked_tokens
    assert not picked[:, 0].any()  # never [CLS]
    assert b["region_features"].shape[2] == model.config.img_feature_dim
    # the rendered shapes' regions plus the whole image; tags: the shapes' names, then [SEP]
    for r, row_mask, tags in zip(records, b["region_mask"], b["tag_ids"], strict=True):
        assert int(row_mask.sum()) == len(r["scene"]) + 1
        words = tokenizer.convert_ids_to_tokens(tags[tags != tokenizer.pad_token_id])
        assert words == [o.shape for o in r["scene"]] + ["[SEP]"]
    gen = collator.generation_batch(records[:2])
    assert gen["input_ids"].tolist() == [[tokenizer.cls_token_id]] * 2


def test_analyze_refuses_a_vinvl_run_in_one_line(tmp_path):
    from ptscale.analysis.analyze import AnalyzeRequest, analyze_runs
    from ptscale.config import dump_recipe

    (tmp_path / "recipe.yaml").write_text(dump_recipe(load_recipe(None, ["model.preset=tiny-vinvl"])))
    with pytest.raises(RecipeError, match=r"is a VinVL run; the analysis reads a vision encoder's") as err:
        analyze_runs(AnalyzeRequest([tmp_path]))
    assert "\n" not in str(err.value)


def test_gradient_checkpointing_gives_the_same_gradients():
    """Recomputation during backward re-reads the stored prefixes through the hook (float64; not bitwise: the
    checkpointed forward may order reductions differently, ~1e-16 relative)."""
    model = PrefixTunedModel(build(), PrefixConfig(lengths={"bert": 3}, init_std=0.5), freeze_base=False)
    model = model.to(torch.float64).train()
    b = batch()
    params = [p for p in model.parameters()]
    calls = []
    model.base.bert.encoder.layer[0].attention.self.register_forward_hook(lambda *_: calls.append(1))
    loss = model(**b).loss
    grads = torch.autograd.grad(loss, params)
    model.base.activation_checkpointing_enable({"use_reentrant": False})
    loss_ckpt = model(**b).loss
    grads_ckpt = torch.autograd.grad(loss_ckpt, params)
    assert len(calls) == 3  # once, then once more in the checkpointed forward and again during its backward
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-12, atol=0)
    for a, c in zip(grads, grads_ckpt, strict=True):
        torch.testing.assert_close(c, a, rtol=1e-12, atol=1e-14)


def test_run_labels_name_vinvl_placements():
    from ptscale.labels import placement

    assert placement(load_recipe(None, ["model.preset=tiny-vinvl", "plan=prefix->full"])) == "prefix BERT 8; full FT"
    assert placement(load_recipe(None, ["model.preset=tiny-vinvl", "plan=prefix->lora"])) == \
        "prefix BERT 8; LoRA r16 BERT query/value"


def test_merged_export_reloads_through_ptscale_with_the_same_logits(tmp_path):
    """--merged on a prefixed VinVL: ptscale.from_pretrained finds the class (ptscale's own, transformers has none)
    and reproduces the trained model; the manifest's plain load line says where the class comes from."""
    from ptscale.hub import from_pretrained
    from ptscale.tuners.export import export_merged, read_manifest

    model = PrefixTunedModel(build(dtype=torch.float32), PrefixConfig(lengths={"bert": 3}, encoder_hidden=8,
                                                                      init_std=0.5)).eval()
    b = _without_labels(batch(dtype=torch.float32))
    with torch.no_grad():
        trained = model(**b).logits
    export_merged(model, tmp_path)
    reloaded = from_pretrained(tmp_path).eval()
    assert isinstance(reloaded.base, VinVLForCaptioning) and set(reloaded.folded()) == {"bert"}
    with torch.no_grad():
        # the export folds the prefix encoder into static keys/values: the same float32 sums, reordered
        torch.testing.assert_close(reloaded(**b).logits, trained, rtol=1e-5, atol=1e-5)
    line = read_manifest(tmp_path)["load"]["transformers"]
    assert line.startswith("from ptscale.models.vinvl import VinVLForCaptioning; VinVLForCaptioning.from_pretrained(")
