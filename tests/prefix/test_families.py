"""Every supported family (BLIP-2 with OPT and with Flan-T5, OPT, Llama and Qwen2 with grouped-query
attention, T5), tiny random configs: prefix length 0 is the base model; the hook equals the explicit
float64 reference (forward and gradients, padding, causality, T5's position bias), classic and
Prefix-Tuning+; generation with and without the KV cache; gradient checkpointing."""

import copy

import pytest
import torch
from transformers import AttentionInterface

import ptscale.prefix.attention as attention
from ptscale.config import PrefixConfig
from ptscale.prefix.attention import ATTN_IMPLEMENTATION, SLOT_ATTR
from ptscale.prefix.model import PrefixTunedModel
from tests.prefix.families import (
    DECODER_ONLY,
    ENCODER_DECODER,
    FAMILIES,
    LENGTHS,
    REFERENCE,
    build,
    make_batch,
    prefixed,
    real_positions,
)


def _wrap(family, *, kind="classic", dtype=torch.float64, seed=0, **cfg):
    return prefixed(build(family, seed=seed, dtype=dtype), LENGTHS[family], kind=kind, dtype=dtype, **cfg)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_length_zero_is_the_base_model(family):
    base = build(family)
    reference = copy.deepcopy(base)
    model = PrefixTunedModel(base, PrefixConfig(lengths=dict.fromkeys(LENGTHS[family], 0)))
    batch = make_batch(family)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference(**batch).logits)
    assert len(model.prefixes) == 0 and base.config._attn_implementation == ATTN_IMPLEMENTATION


@pytest.mark.parametrize("kind", ["classic", "plus"])
@pytest.mark.parametrize("family", FAMILIES)
def test_hook_equals_explicit_reference_float64(family, kind):
    model = _wrap(family, kind=kind)
    batch = make_batch(family, torch.float64)
    params = list(model.prefixes.parameters())
    out = model(**batch)
    grads = torch.autograd.grad(out.loss, params)
    model.base.set_attn_implementation(REFERENCE)
    ref = model(**batch)
    grads_ref = torch.autograd.grad(ref.loss, params)
    with model.prefixes_disabled():
        plain = model(**batch).logits
    real = real_positions(family, batch)
    torch.testing.assert_close(out.logits[real], ref.logits[real], rtol=1e-10, atol=1e-12)
    for a, r in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-13)
    assert all(g.abs().sum() > 0 for g in grads)  # every prefix parameter reaches the loss
    assert (out.logits[real] - plain[real]).abs().max() > 1e-3  # and the prefixes matter
    hooked = [m for m in model.base.modules() if hasattr(m, SLOT_ATTR)]
    assert {getattr(m, SLOT_ATTR).target for m in hooked} == set(LENGTHS[family])


def _generation_inputs(family, batch):
    return {k: v for k, v in batch.items() if k not in ("labels", "decoder_input_ids", "decoder_attention_mask")}


# transformers forces the KV cache for a decoder-only LM fed inputs_embeds (BLIP-2 with OPT): use_cache=False
# is overridden there (generation/utils.py, "must use caching"), so its cache-free check is a loop of full
# forward passes instead (test_blip2_opt_greedy_equals_full_recompute).
FORCED_CACHE = ("blip2-opt",)


@pytest.mark.parametrize("family", ["opt", "llama", "qwen2", "t5", "blip2-opt", "blip2-t5"])
def test_generation_with_and_without_cache(family, monkeypatch):
    """Greedy and 5-beam search through the model's own generate(): identical tokens with and without
    the KV cache, and every prefixed attention call sees exactly its P prefix positions in front of the
    sequence keys (the cache never holds, duplicates or drops the prefix)."""
    model = _wrap(family)
    inputs = _generation_inputs(family, make_batch(family, torch.float64))
    calls: list[dict] = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        slot = getattr(module, SLOT_ATTR, None)
        if slot is not None:
            calls.append({"target": slot.target, "layer": slot.layer, "lq": query.shape[2], "lk": key.shape[2]})
        return attention.prefix_attention_forward(module, query, key, value, attention_mask, **kwargs)

    real_reference = attention.reference_prefix_attention

    def counting_reference(query, key, value, prefix_k, prefix_v, *args, **kwargs):
        calls[-1]["p"] = prefix_k.shape[-2]
        calls[-1]["keys_seen"] = prefix_k.shape[-2] + key.shape[2]
        return real_reference(query, key, value, prefix_k, prefix_v, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, ATTN_IMPLEMENTATION, recording)
    monkeypatch.setattr(attention, "reference_prefix_attention", counting_reference)
    steps = 4
    run = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, return_dict_in_generate=True,
               output_scores=True)
    decoder = "decoder" if family in ENCODER_DECODER else "language_model"
    prompt = 1 if family in ENCODER_DECODER else inputs["input_ids"].shape[1]  # T5: the decoder start token
    outputs = {}
    for beams in (1, 5):
        for cache in (True, False):
            calls.clear()
            outputs[beams, cache] = model.generate(**inputs, num_beams=beams, use_cache=cache, **run)
            assert calls and all(c["p"] == LENGTHS[family][c["target"]] for c in calls)
            layer0 = [c for c in calls if c["target"] == decoder and c["layer"] == 0]
            assert len(layer0) == steps
            for t, c in enumerate(layer0):
                assert c["lk"] == prompt + t  # sequence keys only: no prefix in the cache
                assert c["keys_seen"] == LENGTHS[family][decoder] + prompt + t
                assert c["lq"] == (1 if (cache or family in FORCED_CACHE) and t > 0 else prompt + t)
    for beams in (1, 5):
        cached, uncached = outputs[beams, True], outputs[beams, False]
        # Cached and uncached decoding are different computations (one query against cached keys vs the
        # whole sequence again): their scores agree to rounding (below), not bitwise. The tokens are
        # discrete choices on those scores, equal wherever no two candidates are within rounding of each
        # other: the greedy margins below show they are not, on any machine.
        if beams == 1:
            _assert_clear_argmax(cached.scores, 1e-6)
        assert torch.equal(cached.sequences, uncached.sequences)
        assert cached.sequences.shape[-1] == (1 if family == "blip2-t5" else prompt) + steps
        for a, b in zip(cached.scores, uncached.scores, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(outputs[5, True].sequences_scores, outputs[5, False].sequences_scores)
    with model.prefixes_disabled():  # the prefix changes what is generated
        plain = model.generate(**inputs, num_beams=5, **run)
    assert (plain.sequences_scores - outputs[5, True].sequences_scores).abs().max() > 1e-3


def _assert_clear_argmax(scores, margin: float) -> None:
    """Every row's best score beats the runner-up by more than ``margin`` (well above the tolerance the
    scores of two code paths are compared at), so comparing the chosen tokens exactly is sound."""
    for step in scores:
        top2 = step.double().topk(2, dim=-1).values
        assert (top2[:, 0] - top2[:, 1]).min() > margin


def test_blip2_opt_greedy_equals_full_recompute():
    """The cache-free check for BLIP-2 with OPT: greedy generate() (cached, as transformers forces) equals
    argmax over full forward passes of the whole sequence, prefixes included."""
    family, steps = "blip2-opt", 4
    model = _wrap(family)
    inputs = _generation_inputs(family, make_batch(family, torch.float64))
    # no padding: a decoder-only LM generates after left padding only
    inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    out = model.generate(**inputs, num_beams=1, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         return_dict_in_generate=True, output_scores=True)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    eos = model.base.config.text_config.eos_token_id
    with torch.no_grad():
        for t in range(steps):
            logits = model(pixel_values=inputs["pixel_values"], input_ids=ids, attention_mask=mask).logits[:, -1]
            logits[:, eos] = float("-inf")  # min_new_tokens
            scores = out.scores[t].double().log_softmax(-1)  # generate hands scores back in float32
            torch.testing.assert_close(logits.log_softmax(-1), scores, rtol=1e-6, atol=1e-6)
            _assert_clear_argmax([logits], 1e-4)  # the argmax cannot flip within that tolerance
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(out.sequences, ids)


@pytest.mark.filterwarnings("ignore:.*is deprecated:FutureWarning")  # gradient_checkpointing_* (the recipe's API)
@pytest.mark.parametrize("family", ["llama", "t5", "blip2-opt"])
def test_gradient_checkpointing_gives_identical_gradients(family):
    """HF PEFT refuses gradient checkpointing with prefix tuning; the attention hook re-reads the stored
    prefixes on recomputation, so it works, with the same gradients (float64)."""
    model = _wrap(family)
    model.train()
    batch = make_batch(family, torch.float64)
    params = [p for _, p in model.named_parameters()]
    counts = []

    def run():
        n = {"calls": 0}
        original = attention.reference_prefix_attention

        def counting(*args, **kwargs):
            n["calls"] += 1
            return original(*args, **kwargs)

        attention.reference_prefix_attention = counting
        try:
            loss = model(**batch).loss
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        finally:
            attention.reference_prefix_attention = original
        counts.append(n["calls"])
        return loss, grads

    loss, grads = run()
    model.base.activation_checkpointing_enable({"use_reentrant": False})
    assert model.base.is_gradient_checkpointing
    loss_ckpt, grads_ckpt = run()
    assert counts[1] == 2 * counts[0]  # every prefixed attention ran again during backward
    # Not bitwise: with checkpointing the forward runs inside torch.utils.checkpoint and the backward
    # recomputes it, and the two paths may order float64 reductions differently (T5 in a fresh clone: off
    # by 4.4e-16, i.e. ~1e-16 relative). 1e-12 relative is 4 orders above that rounding and far below what a
    # wrong recomputation does (a prefix missing on recomputation moves the loss by ~1e-2).
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-12, atol=0)
    for name, a, b in zip([n for n, _ in model.named_parameters()], grads, grads_ckpt, strict=True):
        if a is None:
            assert b is None, name
            continue
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14, msg=name)
    prefix_grads = [g for (name, _), g in zip(model.named_parameters(), grads, strict=True)
                    if name.startswith("prefixes.")]
    assert prefix_grads and all(g is not None and g.abs().sum() > 0 for g in prefix_grads)


@pytest.mark.parametrize("family", DECODER_ONLY)
def test_decoder_prefix_lives_on_the_kv_heads(family):
    model = _wrap(family)
    cfg = model.base.config
    kv_heads = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    assert model.prefixes["language_model"]().shape == (cfg.num_hidden_layers, 2, kv_heads, 3, 4)
    assert (kv_heads < cfg.num_attention_heads) == (family != "opt")  # Llama / Qwen2 configs: GQA
