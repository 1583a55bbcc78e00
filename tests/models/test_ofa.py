"""OFA (ptscale.models.ofa) at model level, tiny random configs: OFA's 1-D and 2-D relative-position buckets; text
padding changes no unpadded logit; cached and uncached decoding (greedy and beam, base and prefixed) give the same
tokens; the incremental decoder equals the full forward; the released OFA-Sys folder layout (config.json,
pytorch_model.bin with the port's extra buffers, with and without a ``model.`` prefix, vocab.json + merges.txt)
round-trips and its errors name the key, and the parameter names and shapes are those of OFA-Sys' own port;
parameter groups; the ResNet's BatchNorm statistics train only with the tower; drop path."""

import json
import math
from pathlib import Path

import pytest
import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from ptscale.config import PrefixConfig
from ptscale.models.groups import group_of
from ptscale.models.ofa import (
    UNUSED_KEYS,
    OFAConfig,
    OFAModel,
    OFAResNet,
    image_buckets,
    load_ofa,
    load_tokenizer,
    read_config,
    token_buckets,
)
from ptscale.prefix.model import PrefixTunedModel
from tests.prefix.families import prefixed
from tests.prefix.ofa_families import BOS, EOS, IMAGE, PAD, build_ofa, ofa_batch, ofa_config, prompt

# --- position buckets ------------------------------------------------------------------------------------------------


def _bucket(rel: int, bucket_size: int) -> int:
    """OFA's bucket of one offset, shifted back to be signed (0 = same position)."""
    return int(token_buckets(torch.tensor([rel]), torch.tensor([0]), bucket_size)[0, 0]) - (bucket_size - 1)


def test_token_buckets_follow_ofas_definition():
    size, mid = 16, 8
    # within bucket_size // 2 the offset is its own bucket (both signs, the boundary included)
    assert [_bucket(r, size) for r in (0, 1, 5, 7, 8)] == [0, 1, 5, 7, 8]
    assert [_bucket(-r, size) for r in (1, 5, 7, 8)] == [-1, -5, -7, -8]
    # beyond it: mid + ceil(log(d / mid) / log(1023 / mid) * (mid - 1)), worked out by hand:
    # d = 9: log(1.125) / log(127.875) * 7 = 0.170 -> 1 -> 9; d = 20: 1.322 -> 2 -> 10; d = 100: 3.644 -> 4 -> 12
    assert [_bucket(d, size) for d in (9, 20, 100, 1023)] == [9, 10, 12, 15]
    for d in (9, 20, 100, 500, 1023):  # the same from the formula, in double precision
        assert _bucket(d, size) == mid + math.ceil(math.log(d / mid) / math.log(1023 / mid) * (mid - 1))
    # symmetric in sign, monotone, and capped at the last bucket (bucket_size - 1) at OFA's 1,023 positions
    pos = torch.arange(1024)
    forward = token_buckets(pos, torch.tensor([0]), size)[:, 0] - (size - 1)
    backward = token_buckets(torch.tensor([0]), pos, size)[0] - (size - 1)
    assert torch.equal(backward, -forward)
    assert bool((forward[1:] >= forward[:-1]).all()) and int(forward.max()) == size - 1
    full = token_buckets(pos, pos, size)
    assert int(full.min()) == 0 and int(full.max()) == 2 * size - 2  # fits the (2 * size - 1)-row table
    # OFA-base's token_bucket_size 256: linear to 128, the last bucket at 1023
    assert [_bucket(d, 256) for d in (127, 128, 129, 1023)] == [127, 128, 129, 255]


def test_image_buckets_are_row_and_column_offsets():
    size, h, w = 8, 3, 4
    span = 2 * size - 1
    got = image_buckets(h, w, size, torch.device("cpu"))
    assert got.shape == (h * w, h * w)
    for i in range(h * w):
        for j in range(h * w):
            dr, dc = i // w - j // w, i % w - j % w
            assert int(got[i, j]) == (dr + size - 1) * span + (dc + size - 1)
    # by hand: cell (0, 0) against (2, 3): (-2 + 7) * 15 + (-3 + 7) = 79; a cell against itself: 7 * 15 + 7 = 112
    assert int(got[0, 2 * w + 3]) == 79 and int(got[5, 5]) == 112


# --- forward, padding, decoding --------------------------------------------------------------------------------------


def test_text_padding_changes_no_logit_of_a_row():
    """Each row of a right-padded batch gives the logits it gives alone, without its padding."""
    model = build_ofa()
    batch = ofa_batch()
    keep = ("input_ids", "attention_mask", "pixel_values", "decoder_input_ids")
    with torch.no_grad():
        both = model(**{k: batch[k] for k in keep}).logits
        length = int(batch["attention_mask"][1].sum())
        rows = [model(input_ids=batch["input_ids"][i:i + 1, :n], pixel_values=batch["pixel_values"][i:i + 1],
                      decoder_input_ids=batch["decoder_input_ids"][i:i + 1]).logits
                for i, n in ((0, batch["input_ids"].shape[1]), (1, length))]
    assert bool((batch["input_ids"][1, length:] == PAD).all())
    # Padded keys get exp(finfo.min + bias) = 0 exactly; what differs is the shape of the float64 reductions
    # (~1e-15); a padded key that leaked would move the logits by ~1e-1.
    for i in range(2):
        torch.testing.assert_close(both[i], rows[i][0], rtol=1e-10, atol=1e-12)
    # the padding does matter if it is not masked: the same tokens read as text move the logits
    with torch.no_grad():
        unmasked = model(input_ids=batch["input_ids"][1:], pixel_values=batch["pixel_values"][1:],
                         attention_mask=torch.ones_like(batch["input_ids"][1:]),
                         decoder_input_ids=batch["decoder_input_ids"][1:]).logits
    assert (unmasked[0] - rows[1][0]).abs().max() > 1e-3


def test_a_row_without_its_image_gives_the_text_only_logits():
    """patch_masks False: that row's image cells are padding; its logits are those of its text alone (no image)."""
    model = build_ofa()
    batch = ofa_batch()
    dec = batch["decoder_input_ids"]
    with torch.no_grad():
        both = model(**prompt(batch), patch_masks=torch.tensor([True, False]), decoder_input_ids=dec).logits
        text = model(input_ids=batch["input_ids"][1:, :4], decoder_input_ids=dec[1:]).logits
        first = model(**{k: v[:1] for k, v in prompt(batch).items()}, decoder_input_ids=dec[:1]).logits
        second = model(**{k: v[1:] for k, v in prompt(batch).items()}, decoder_input_ids=dec[1:]).logits
    # masked keys add exactly 0; the rest is float64 rounding over differently shaped tensors
    torch.testing.assert_close(both[1], text[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(both[0], first[0], rtol=1e-10, atol=1e-12)
    assert (second[0] - text[0]).abs().max() > 1e-3  # the image matters where it is kept


def _prefixed_ofa():
    return prefixed(build_ofa(), {"encoder": 3, "decoder": 2})


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("which", ["base", "prefixed", "entangled"])
def test_cached_and_uncached_decoding_give_the_same_tokens(which, beams):
    """"entangled": positions added to the decoder's input too, from the cache length when decoding with it."""
    model = {"base": build_ofa, "prefixed": _prefixed_ofa,
             "entangled": lambda: build_ofa(entangle_position_embedding=True)}[which]()
    batch = ofa_batch()
    steps = 6
    run = dict(max_new_tokens=steps, min_new_tokens=steps, num_beams=beams, do_sample=False,
               return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        cached = model.generate(**prompt(batch), use_cache=True, **run)
        uncached = model.generate(**prompt(batch), use_cache=False, **run)
    # Cached and uncached decoding are different computations: scores agree to float64 rounding, not bitwise; the
    # tokens are equal wherever no two candidates are within rounding, which the greedy margins show.
    if beams == 1:
        for step in cached.scores:
            top2 = step.topk(2, dim=-1).values
            assert (top2[:, 0] - top2[:, 1]).min() > 1e-6
    assert torch.equal(cached.sequences, uncached.sequences)
    assert cached.sequences.shape == (2, 1 + steps) and bool((cached.sequences[:, 0] == BOS).all())
    for a, b in zip(cached.scores, uncached.scores, strict=True):  # every step, the whole vocabulary
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    if which == "prefixed":  # the prefix takes part in what is generated
        with torch.no_grad(), model.prefixes_disabled():
            plain = model.generate(**prompt(batch), use_cache=True, **run)
        # (min_new_tokens makes EOS -inf in every score: compare the finite entries)
        assert max((a - b)[a.isfinite()].abs().max() for a, b in zip(plain.scores, cached.scores, strict=True)) > 1e-3


def _new_cache(model) -> EncoderDecoderCache:
    return EncoderDecoderCache(DynamicCache(config=model.config), DynamicCache(config=model.config))


def test_incremental_decoder_equals_the_full_forward():
    """Decoding with a cache (a two-token prefill, then one token at a time) gives the full forward's logits: the
    positions, the causal mask and the relative bias all come from the cache length."""
    model = build_ofa()
    batch = ofa_batch()
    dec = batch["decoder_input_ids"]
    with torch.no_grad():
        encoder = model.get_encoder()(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
        full = model(encoder_outputs=encoder, decoder_input_ids=dec).logits
        cache = _new_cache(model)
        pieces = [model(encoder_outputs=encoder, decoder_input_ids=dec[:, :2], past_key_values=cache,
                        use_cache=True).logits]
        for t in range(2, dec.shape[1]):
            assert cache.self_attention_cache.get_seq_length() == t
            pieces.append(model(encoder_outputs=encoder, decoder_input_ids=dec[:, t:t + 1], past_key_values=cache,
                                use_cache=True).logits)
    # float64; the same products summed over differently shaped tensors (~1e-15)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-10, atol=1e-12)
    # a wrong position (one token decoded as if at position 0) changes the logits: the check can fail
    with torch.no_grad():
        alone = model(encoder_outputs=encoder, decoder_input_ids=dec[:, 3:4]).logits
    assert (alone[:, 0] - full[:, 3]).abs().max() > 1e-3


def test_the_decoder_input_embedding_carries_no_position():
    """OFA's decoder embeds a token as layernorm_embedding(embed_scale * embed_tokens(token)): positions enter through
    the attention's position bias only. OFA-Sys' transformers port adds the absolute position embedding only under
    ``entangle_position_embedding`` (false in the released configs), and its fairseq code only without
    ``--disable-entangle``, which every OFA pre-training, captioning and VQA training script passes. With
    ``entangle_position_embedding`` the absolute position embedding is added before the layer norm."""
    batch = ofa_batch()
    dec = batch["decoder_input_ids"]
    for entangle in (False, True):
        model = build_ofa(entangle_position_embedding=entangle)
        with torch.no_grad():
            states = model(**prompt(batch), decoder_input_ids=dec, output_hidden_states=True).decoder_hidden_states
            x = model.decoder.embed_tokens(dec) * model.decoder.embed_scale
            if entangle:
                x = x + model.decoder.embed_positions(torch.arange(dec.shape[1]))
            want = model.decoder.layernorm_embedding(x)
        torch.testing.assert_close(states[0], want, rtol=1e-12, atol=1e-12)


def test_labels_give_teacher_forcing_and_a_loss():
    model = build_ofa()
    batch = ofa_batch()
    labels = batch["labels"].clone()
    labels[0, -1] = -100
    out = model(**prompt(batch), labels=labels)
    teacher = model(**prompt(batch), decoder_input_ids=torch.cat([torch.full((2, 1), BOS), labels[:, :-1]], 1))
    torch.testing.assert_close(out.logits, teacher.logits, rtol=0, atol=0)
    expected = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), labels.reshape(-1))
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-6, atol=0)


def test_the_loss_keeps_the_precision_of_a_float64_model():
    """The loss is taken in at least float32 (for a bf16 model), never below the logits' own precision: the float64
    checks of gradients through the loss need it."""
    model = build_ofa()
    batch = ofa_batch()
    out = model(**prompt(batch), labels=batch["labels"])
    assert out.logits.dtype == torch.float64
    assert out.loss.dtype == torch.float64


# --- the released layout ---------------------------------------------------------------------------------------------
SENTENCES = ["a cat sits on a mat.", "two dogs run in the park.", " what does the image describe?",
             "a man rides a red bike down the street.", "how many people are in the picture?"]
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # BART's order: <s> 0, <pad> 1, </s> 2, <unk> 3
NUM_CODES, NUM_BINS = 4, 3


def _write_bpe(path) -> int:
    """A small byte-level BPE (vocab.json + merges.txt) the way BART's looks; returns its size."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(SENTENCES, vocab_size=300, min_frequency=1, special_tokens=SPECIALS)
    bpe.save_model(str(path))
    return bpe.get_vocab_size()


def _released_config(vocab_size: int, **over) -> dict:
    """config.json as OFA-Sys' HF folders have it (their keys, including the ones this port does not read), for the
    tiny model, plus ptscale's resnet_layers / num_codes / num_bins."""
    cfg = {"_name_or_path": "ofa-tiny", "activation_dropout": 0.0, "activation_function": "gelu",
           "add_type_embedding": True, "architectures": ["OFAModel"], "attention_dropout": 0.0,
           "attn_scale_factor": 2.0, "bos_token_id": BOS, "classifier_dropout": 0.0, "code_image_size": 128,
           "code_layernorm_embedding": True, "d_model": 32, "decoder_attention_heads": 4,
           "decoder_drop_path_rate": 0.0, "decoder_ffn_dim": 64, "decoder_layerdrop": 0.0, "decoder_layers": 2,
           "decoder_normalize_before": True, "decoder_start_token_id": BOS, "dropout": 0.0,
           "encoder_attention_heads": 4, "encoder_drop_path_rate": 0.0, "encoder_ffn_dim": 64,
           "encoder_layerdrop": 0.0, "encoder_layers": 2, "encoder_normalize_before": True,
           "entangle_position_embedding": False, "eos_token_id": EOS, "forced_eos_token_id": EOS,
           "image_bucket_size": 8, "init_std": 0.02, "is_encoder_decoder": True, "layernorm_embedding": True,
           "max_position_embeddings": 64, "model_type": "ofa", "normformer": True, "num_hidden_layers": 2,
           "pad_token_id": PAD, "patch_layernorm_embedding": True, "resnet_drop_path_rate": 0.0,
           "resnet_model_path": None, "resnet_type": "resnet50", "scale_embedding": False,
           "share_decoder_input_output_embed": True, "token_bucket_size": 16, "torch_dtype": "float32",
           "transformers_version": "4.18.0.dev0", "use_cache": False, "vocab_size": vocab_size,
           "resnet_layers": [1, 1, 1], "num_codes": NUM_CODES, "num_bins": NUM_BINS, "image_resolution": IMAGE}
    cfg.update(over)
    return cfg


def _released_state(model, prefix: str = "") -> dict:
    """The model's state dict as the released port saved it: every key (tied copies included) plus its recomputed
    buffers (the bucket tables, the decoder's image position index, fairseq's version counters)."""
    g = torch.Generator().manual_seed(7)
    cells = 8 ** 2 + 1
    extra = {"encoder.token_rp_bucket": torch.randint(0, 31, (64, 64), generator=g),
             "decoder.token_rp_bucket": torch.randint(0, 31, (64, 64), generator=g),
             "encoder.image_rp_bucket": torch.randint(0, 228, (cells, cells), generator=g),
             "decoder.image_rp_bucket": torch.randint(0, 228, (cells, cells), generator=g),
             "decoder.image_position_idx": torch.randint(0, 1025, (1025,), generator=g),
             "encoder.version": torch.tensor([3.0]), "decoder.version": torch.tensor([3.0])}
    assert set(extra) == set(UNUSED_KEYS)
    state = {**{k: v.clone() for k, v in model.state_dict().items()}, **extra}
    return {prefix + k: v for k, v in state.items()}


def _original(vocab_size: int, **kw):
    """A tiny float32 OFA whose every weight and BatchNorm statistic differs from its initial value, so a weight
    that did not load would show in the logits."""
    model = build_ofa(seed=3, dtype=torch.float32, vocab_size=vocab_size, num_codes=NUM_CODES, num_bins=NUM_BINS,
                      **kw)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.num_batches_tracked.fill_(1000)
    return model


def _write_released(path, model, vocab_size: int, *, prefix: str = "", state: dict | None = None, **config) -> None:
    path.mkdir(parents=True, exist_ok=True)
    _write_bpe(path)
    (path / "config.json").write_text(json.dumps(_released_config(vocab_size, **config), indent=2))
    torch.save(state if state is not None else _released_state(model, prefix), path / "pytorch_model.bin")


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(directory, the original model, the BPE size) of a tiny OFA written in the released layout."""
    path = tmp_path_factory.mktemp("ofa-tiny")
    bpe = _write_bpe(path)
    vocab_size = bpe + NUM_CODES + NUM_BINS
    model = _original(vocab_size)
    _write_released(path, model, vocab_size)
    return path, model, bpe


def _logits(model, batch):
    with torch.no_grad():
        return model(**prompt(batch), decoder_input_ids=batch["decoder_input_ids"]).logits


@pytest.mark.parametrize("prefix", ["", "model."])
def test_load_ofa_reads_the_released_layout(released, tmp_path, prefix):
    path, original, bpe = released
    if prefix:
        path = tmp_path / "prefixed"
        _write_released(path, original, bpe + NUM_CODES + NUM_BINS, prefix=prefix)
    loaded = load_ofa(path)
    assert not loaded.training and loaded.config.vocab_size == bpe + NUM_CODES + NUM_BINS
    assert (loaded.config.token_bucket_size, loaded.config.image_bucket_size) == (16, 8)
    assert loaded.decoder.output_projection.weight is loaded.encoder.embed_tokens.weight  # tied, as released
    batch = ofa_batch(dtype=torch.float32)
    batch["input_ids"] = batch["input_ids"] + 100  # ids across the BPE part of the vocabulary
    batch["input_ids"][:, 0], batch["input_ids"][1, -3:] = BOS, PAD
    # the same weights and buffers through the same code on the same inputs: the same float32 operations
    assert torch.equal(_logits(loaded, batch), _logits(original, batch))
    for name, buf in original.named_buffers():
        assert torch.equal(loaded.get_buffer(name), buf), name


def test_load_tokenizer_puts_codes_then_bins_after_the_bpe(released):
    path, original, bpe = released
    tokenizer = load_tokenizer(path, original.config)
    assert len(tokenizer) == original.config.vocab_size
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id) == (BOS, PAD, EOS)
    assert tokenizer.convert_tokens_to_ids("<code_0>") == bpe
    assert tokenizer.convert_tokens_to_ids(f"<code_{NUM_CODES - 1}>") == bpe + NUM_CODES - 1
    assert tokenizer.convert_tokens_to_ids("<bin_0>") == bpe + NUM_CODES
    assert tokenizer.convert_tokens_to_ids(f"<bin_{NUM_BINS - 1}>") == original.config.vocab_size - 1
    # the BPE itself is the one in vocab.json: a training sentence encodes to its own merges and back
    vocab = json.loads((path / "vocab.json").read_text())
    ids = tokenizer(SENTENCES[2]).input_ids
    assert ids[0] == BOS and ids[-1] == EOS and all(i < bpe for i in ids)
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == [t for t in tokenizer.tokenize(SENTENCES[2])]
    assert all(vocab[t] == i for t, i in zip(tokenizer.tokenize(SENTENCES[2]), ids[1:-1], strict=True))
    assert tokenizer.decode(ids, skip_special_tokens=True) == SENTENCES[2]
    assert bpe + 1 in tokenizer(" a cat<code_1>").input_ids  # an added token is one token


def test_a_saved_tokenizer_directory_loads_as_it_was_saved(released, tmp_path):
    """A directory ``save_pretrained`` wrote (tokenizer.json, codes and bins already in it) loads as it is."""
    from transformers import BartTokenizerFast

    path, original, bpe = released
    built = BartTokenizerFast(vocab=str(path / "vocab.json"), merges=str(path / "merges.txt"))
    built.add_tokens([f"<code_{i}>" for i in range(NUM_CODES)] + [f"<bin_{i}>" for i in range(NUM_BINS)])
    built.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path, original.config)
    text = SENTENCES[0] + " <code_2> <bin_1>"
    assert loaded(text).input_ids == built(text).input_ids
    assert loaded.convert_tokens_to_ids(["<code_0>", "<bin_0>"]) == [bpe, bpe + NUM_CODES]


def test_a_tokenizer_of_another_size_is_an_error(released):
    path, original, _ = released
    config = read_config(path)
    config.vocab_size += 1
    with pytest.raises(ValueError, match=rf"tokens .* the model's vocabulary {config.vocab_size}"):
        load_tokenizer(path, config)


def test_a_missing_key_is_an_error_naming_it(released, tmp_path):
    _, original, bpe = released
    state = _released_state(original)
    del state["encoder.layers.1.self_attn.c_attn"]
    _write_released(tmp_path, original, bpe + NUM_CODES + NUM_BINS, state=state)
    with pytest.raises(ValueError, match=r"missing \['encoder\.layers\.1\.self_attn\.c_attn'\]"):
        load_ofa(tmp_path)


def test_an_unexpected_key_is_an_error_naming_it(released, tmp_path):
    _, original, bpe = released
    state = _released_state(original, "model.")
    state["model.decoder.layers.0.extra_norm.weight"] = torch.ones(32)
    _write_released(tmp_path, original, bpe + NUM_CODES + NUM_BINS, state=state)
    with pytest.raises(ValueError, match=r"unexpected \['decoder\.layers\.0\.extra_norm\.weight'\]"):
        load_ofa(tmp_path)


def test_tied_copies_may_be_absent_but_an_untied_output_projection_may_not(released, tmp_path):
    """The released files may or may not carry the tied copies of the embeddings; a model whose output projection
    is its own weight (share_decoder_input_output_embed false) must find it, not start from a random one."""
    _, original, bpe = released
    vocab_size = bpe + NUM_CODES + NUM_BINS
    state = _released_state(original)
    for key in ("decoder.embed_tokens.weight", "decoder.output_projection.weight"):
        del state[key]
    _write_released(tmp_path / "tied", original, vocab_size, state=state)
    batch = ofa_batch(dtype=torch.float32)
    assert torch.equal(_logits(load_ofa(tmp_path / "tied"), batch), _logits(original, batch))

    untied = _original(vocab_size, share_decoder_input_output_embed=False)
    state = _released_state(untied)
    del state["decoder.output_projection.weight"]
    _write_released(tmp_path / "untied", untied, vocab_size, state=state, share_decoder_input_output_embed=False)
    with pytest.raises(ValueError, match=r"missing \['decoder\.output_projection\.weight'\]"):
        load_ofa(tmp_path / "untied")


# --- parameter groups and the ResNet ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [True, False])
def test_every_parameter_has_its_group(shared):
    model = PrefixTunedModel(build_ofa(share_decoder_input_output_embed=shared),
                             PrefixConfig(lengths={"language_model": 4}))
    groups = {name: group_of(name) for name, _ in model.named_parameters()}  # KeyError for one in no group
    for name, group in groups.items():
        if name.startswith("prefixes."):
            expected = "prefix"
        elif name.startswith(("base.encoder.embed_images.", "base.encoder.image_proj.",
                              "base.encoder.patch_layernorm_embedding.")):
            expected = "vision"
        elif any(f".{e}." in name for e in ("embed_tokens", "embed_positions", "embed_image_positions")):
            expected = "embeddings"
        elif name.startswith("base.decoder.output_projection."):
            expected = "lm_head"
        else:
            expected = "language_model"
        assert group == expected, name
    assert groups["base.encoder.embed_tokens.weight"] == "embeddings"
    assert groups["base.encoder.layers.0.self_attn.c_attn"] == "language_model"  # adopted by its wrapper
    assert groups["base.decoder.layers.1.cross_attn.k_proj.weight"] == "language_model"
    assert groups["base.encoder.embed_images.layer3.0.conv2.weight"] == "vision"
    assert ("base.decoder.output_projection.weight" in groups) is not shared


def test_resnet_batchnorm_statistics_train_only_with_the_tower():
    """A stage that freezes the ResNet (prefix, LoRA, adapters) keeps its BatchNorm statistics and uses them in
    train() mode; a stage that trains it (full fine-tuning, as OFA's captioning and VQA scripts do) trains them."""
    model = build_ofa()
    resnet = model.encoder.embed_images
    assert isinstance(resnet, OFAResNet)
    batch = ofa_batch()
    with torch.no_grad():
        for m in resnet.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    with torch.no_grad():
        features = resnet(batch["pixel_values"])
    wrapped = PrefixTunedModel(model, PrefixConfig(lengths={"language_model": 2}))  # the base frozen
    wrapped.train()
    assert model.training and resnet.training
    assert all(not m.training for m in resnet.modules() if isinstance(m, torch.nn.BatchNorm2d))
    for _ in range(2):
        wrapped(**batch).loss.backward()
    assert all(torch.equal(v, before[k]) for k, v in resnet.state_dict().items())
    with torch.no_grad():
        assert torch.equal(resnet(batch["pixel_values"]), features)  # train mode computes what eval mode does
    for p in resnet.parameters():  # the tower trains: so do its statistics
        p.requires_grad_(True)
    wrapped.train()
    assert all(m.training for m in resnet.modules() if isinstance(m, torch.nn.BatchNorm2d))
    wrapped(**batch).loss.backward()
    assert resnet.bn1.weight.grad is not None
    assert not torch.equal(resnet.bn1.running_mean, before["bn1.running_mean"])


def test_unsupported_settings_are_refused():
    for key in ("encoder_layerdrop", "decoder_layerdrop", "resnet_drop_path_rate"):
        with pytest.raises(ValueError, match=key):
            build_ofa(**{key: 0.1})
    assert ofa_config().stages() == (1, 1, 1)


def test_each_decoding_step_feeds_the_tokens_the_cache_has_not_seen():
    """And at least the last one: under ``synced_gpus`` (ZeRO-3 generation) a rank whose beams have all ended keeps
    running forwards without growing its sequences, so its cache has seen every token (a 2-rank run crashed on an
    empty step before this)."""
    model = build_ofa()
    batch = ofa_batch()
    cache = _new_cache(model)
    encoder = model.get_encoder()(**prompt(batch))
    ids = batch["decoder_input_ids"][:, :3]
    with torch.no_grad():
        model(decoder_input_ids=ids, encoder_outputs=encoder, past_key_values=cache, use_cache=True)
    grown = batch["decoder_input_ids"][:, :4]
    step = model.prepare_inputs_for_generation(grown, past_key_values=cache, encoder_outputs=encoder, use_cache=True)
    assert torch.equal(step["decoder_input_ids"], grown[:, 3:])  # the one new token
    step = model.prepare_inputs_for_generation(ids, past_key_values=cache, encoder_outputs=encoder, use_cache=True)
    assert torch.equal(step["decoder_input_ids"], ids[:, 2:])  # nothing new: the last token again


def test_drop_path_rises_over_the_layers_and_acts_in_training_only():
    """OFA's stochastic depth (its fine-tuning scripts use 0.1): layer i of n drops its residual branches with
    probability rate * i / (n - 1); eval computes what the model without drop path computes."""
    plain, dropped = build_ofa(), build_ofa(encoder_drop_path_rate=0.5, decoder_drop_path_rate=0.5)
    assert [layer.drop_path_rate for layer in dropped.encoder.layers] == [0.0, 0.5]
    assert [layer.drop_path_rate for layer in dropped.decoder.layers] == [0.0, 0.5]
    batch = ofa_batch()
    with torch.no_grad():
        assert torch.equal(dropped(**batch).logits, plain(**batch).logits)  # the same weights (seed), eval
        dropped.train()
        torch.manual_seed(0)
        trained = [dropped(**batch).logits for _ in range(4)]
    assert any(not torch.equal(t, trained[0]) for t in trained[1:])  # samples' branches dropped at random


def test_parameter_names_and_shapes_are_the_released_ports():
    """Independent of ptscale's own state dict: the names and shapes OFA-Sys' transformers port gives a tiny
    resnet50-type OFA (recorded in tests/models/data/ofa_released_keys.json) are ptscale's, but for the bucket tables
    that port saves and ptscale recomputes."""
    recorded = json.loads((Path(__file__).parent / "data" / "ofa_released_keys.json").read_text())
    ours = OFAModel(OFAConfig(**recorded["config"], image_resolution=64)).state_dict()
    theirs = {k: v for k, v in recorded["keys"].items() if not k.startswith(UNUSED_KEYS)}
    assert {k: list(v.shape) for k, v in ours.items()} == theirs
    assert set(recorded["keys"]) - set(theirs) == {k for k in UNUSED_KEYS if not k.endswith(".version")}
