"""Prefix-Tuning+ Triton kernel vs. a float64 reference, under the Triton interpreter (see conftest.py).

The reference is independent of the kernel package's memory code: torch SDPA over the sequence
(`prefix_attention_reference` with P = 0) plus ``ptscale.prefix.plus.memory_term``, the definition the
model uses, in float64. Every case draws fresh seeded inputs, fills every buffer the kernels write with
NaN first, and compares the output and the gradients of q, k, v, the prefix keys and values (through
`plus_memory`) and the gate.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import ptscale_kernels
import pytest
import torch
from ptscale_kernels import (
    KernelConfig,
    PlusConfig,
    plus_memory,
    prefix_attention,
    prefix_attention_reference,
    prefix_plus_attention,
)
from ptscale_kernels import triton_prefix_plus as tpp
from triton.runtime.interpreter import InterpretedFunction

import ptscale.prefix.attention as attention
from ptscale.prefix.attention import PrefixSlot, PrefixStore, attach, prefix_attention_forward
from ptscale.prefix.plus import PlusLayer, PlusState, memory_term


@dataclass(frozen=True)
class Case:
    batch: int
    heads: int
    seq_len: int
    prefix_len: int
    head_dim: int
    causal: bool
    padding: bool
    feature_map: str
    dtype: torch.dtype = torch.float32
    config: PlusConfig | None = None

    def __str__(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        tag = "cfg" if self.config is not None else "default"
        return (
            f"B{self.batch}-H{self.heads}-L{self.seq_len}-P{self.prefix_len}-D{self.head_dim}-"
            f"{'causal' if self.causal else 'bidir'}-{'pad' if self.padding else 'nopad'}-{self.feature_map}-"
            f"{dtype}-{tag}"
        )


# Interpreter tiles are 16 rows / keys and 32 dM columns (default_plus_config): L = 17 / 33 ends in a ragged
# block, D = 80 runs as 128 with a ragged last dM column block, P = 37 is not a multiple of anything.
_FIXED = [
    Case(2, 2, 1, 1, 64, True, False, "elu1"),
    Case(2, 2, 17, 5, 64, False, True, "relu"),
    Case(2, 1, 33, 37, 80, True, True, "elu1"),
    Case(1, 2, 17, 16, 80, True, False, "identity"),
    Case(3, 1, 20, 8, 64, False, True, "identity"),
    Case(1, 1, 18, 3, 128, True, True, "relu"),
    Case(2, 1, 32, 16, 64, False, False, "elu1"),  # L a multiple of every tile: only unmasked fast paths
]


def _random_cases(n: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    return [
        Case(
            batch=rng.randint(1, 3),
            heads=rng.randint(1, 2),
            seq_len=rng.randint(1, 36),
            prefix_len=rng.choice([1, 5, 16, 37, rng.randint(1, 40)]),
            head_dim=rng.choice([64, 80]),
            causal=rng.random() < 0.5,
            padding=rng.random() < 0.5,
            feature_map=rng.choice(tpp.FEATURE_MAPS),
        )
        for _ in range(n)
    ]


_FP16 = [
    Case(2, 1, 33, 8, 80, True, True, "elu1", torch.float16),
    Case(2, 1, 17, 37, 64, False, True, "relu", torch.float16),
    Case(1, 2, 20, 5, 64, True, False, "identity", torch.float16),
]

# Unequal tiles (block_m = 2 block_n, ...), a 32-column contraction step (D = 80: a ragged last step), 16-column
# dM blocks and two splits of the memory-gradient pass.
_CONFIG = PlusConfig(KernelConfig(32, 16, 16, 16, 32, 32, 16, prefix_splits=1), block_r=32, block_c=32,
                     block_e=16, splits=2)  # fmt: skip
_CONFIGS = [
    Case(2, 1, 45, 7, 80, True, True, "elu1", config=_CONFIG),
    Case(3, 1, 40, 12, 64, False, True, "relu", config=_CONFIG),
]

CASES = _FIXED + _random_cases(4, seed=20250614) + _FP16 + _CONFIGS


def _padding_mask(batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    # Batch 0: left padding (causal: its first queries see no sequence key, only the memory); batch 1:
    # right padding (whole key tiles padded); batch 2: random holes.
    mask = torch.rand(batch, seq_len, generator=gen) < 0.7
    mask[0] = torch.arange(seq_len) >= seq_len // 3
    if batch > 1:
        mask[1] = torch.arange(seq_len) < seq_len // 4 + 1
    return mask


def _inputs(case: Case, seed: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """[q, k, v, prefix_k, prefix_v, gate] in float64, grad_out, key padding mask."""
    gen = torch.Generator().manual_seed(seed)
    shape = (case.batch, case.heads, case.seq_len, case.head_dim)
    prefix_shape = (case.heads, case.prefix_len, case.head_dim)
    tensors = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3)]
    tensors += [torch.randn(prefix_shape, generator=gen, dtype=torch.float64) for _ in range(2)]
    tensors.append(torch.randn(case.heads, generator=gen, dtype=torch.float64))
    grad_out = torch.randn(shape, generator=gen, dtype=torch.float64)
    mask = _padding_mask(case.batch, case.seq_len, gen) if case.padding else None
    return tensors, grad_out, mask


def plus_reference(q, k, v, prefix_k, prefix_v, gate, *, feature_map, key_padding_mask=None, causal=False,
                   scale=None):  # fmt: skip
    """SDPA over the sequence + the model's own memory term (float64 in, float64 out)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    empty = q.new_empty(q.shape[1], 0, q.shape[-1])
    out = prefix_attention_reference(q, k, v, empty, empty, key_padding_mask=key_padding_mask, causal=causal,
                                     scale=scale)  # fmt: skip
    return out + memory_term(q, PlusLayer(prefix_k, prefix_v, gate, feature_map), scale)


def plus_kernel(q, k, v, prefix_k, prefix_v, gate, *, feature_map, config=None, **kwargs):
    memory, norm = plus_memory(prefix_k, prefix_v, feature_map)
    return tpp._prefix_plus_attention(q, k, v, memory, norm, gate, feature_map=feature_map, config=config, **kwargs)


def _run(fn, tensors, grad_out, dtype, **kwargs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    # q, k, v in the activation dtype; the prefix and the gate are parameters, fp32 (float64 for the reference).
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = [t.detach().to(dtype if i < 3 else param_dtype).requires_grad_() for i, t in enumerate(tensors)]
    out = fn(*leaves, **kwargs)
    out.backward(grad_out.to(dtype))
    return out.detach(), [t.grad for t in leaves]


def _assert_close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values (an unwritten element stays NaN)"
    err = (got.double() - want).abs().max().item()
    bound = tol * max(1.0, want.abs().max().item())
    assert err <= bound, f"{name}: max abs error {err:.3e} > {bound:.3e}"


_TOLERANCE = {torch.float32: 2e-5, torch.float16: 1e-2}
_GRAD_NAMES = ("dq", "dk", "dv", "dprefix_k", "dprefix_v", "dgate")


def _check_case(case: Case, seed: int) -> None:
    tensors, grad_out, mask = _inputs(case, seed)
    kwargs = dict(feature_map=case.feature_map, key_padding_mask=mask, causal=case.causal)
    want, want_grads = _run(plus_reference, tensors, grad_out, torch.float64, **kwargs)
    got, got_grads = _run(plus_kernel, tensors, grad_out, case.dtype, config=case.config, **kwargs)
    tol = _TOLERANCE[case.dtype]
    _assert_close("o", got, want, tol)
    for name, g, w in zip(_GRAD_NAMES, got_grads, want_grads, strict=True):
        _assert_close(name, g, w, tol)


def test_interpreter_is_active():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    for kernel in (tpp._plus_fwd, tpp._plus_bwd_memory, tpp._plus_bwd_dq):
        assert isinstance(kernel, InterpretedFunction)
    cfg = tpp.default_plus_config(2, 2, 33, 80, torch.float32, torch.device("cpu"))
    assert (cfg.seq.block_m, cfg.block_r, cfg.block_c, cfg.block_e, cfg.splits) == (16, 16, 16, 32, 3)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_float64_reference(case: Case, poisoned):
    _check_case(case, seed=zlib.crc32(str(case).encode()))


def test_zero_gate_is_plain_attention(poisoned):
    # A fresh plus-prefix (gate 0) must leave the attention exactly as the classic kernel computes it with no
    # prefix, gradients included; the gate's own gradient is still sum_i dO_i . m_i, and the prefix gets 0.
    case = Case(2, 2, 21, 6, 64, True, True, "elu1")
    tensors, grad_out, mask = _inputs(case, seed=4)
    tensors[5] = torch.zeros_like(tensors[5])
    kwargs = dict(key_padding_mask=mask, causal=True)
    got, got_grads = _run(plus_kernel, tensors, grad_out, torch.float32, feature_map="elu1", **kwargs)
    empty = torch.empty(2, 0, 64)
    plain, plain_grads = _run(lambda q, k, v: prefix_attention(q, k, v, empty, empty, **kwargs), tensors[:3],
                              grad_out, torch.float32)  # fmt: skip
    assert torch.equal(got, plain)
    for name, g, p in zip(_GRAD_NAMES[:3], got_grads[:3], plain_grads, strict=True):
        assert torch.equal(g, p), name
    assert got_grads[3].abs().max() == 0 and got_grads[4].abs().max() == 0
    _, want_grads = _run(plus_reference, tensors, grad_out, torch.float64, feature_map="elu1", **kwargs)
    _assert_close("dgate", got_grads[5], want_grads[5], 2e-5)
    assert want_grads[5].abs().max() > 0.1


def test_relu_zero_normaliser_gives_zero_memory_term(poisoned):
    # relu can make phi(s q) . z = 0: all of q_i <= 0 (phi = 0), or phi(s q_i) > 0 only where every prefix key
    # is <= 0 (z = 0 and M = 0 there). Then m_i = 0 / eps = 0, exactly as plus.py defines it, and the gradients
    # stay finite and exact (the intermediate dM of those rows is large, ~1 / eps, but meets phi'(k) = 0).
    case = Case(2, 1, 17, 6, 64, True, True, "relu")
    tensors, grad_out, mask = _inputs(case, seed=5)
    q, prefix_k = tensors[0], tensors[3]
    q[0, :, :5] = -q[0, :, :5].abs()  # phi(s q) = 0
    prefix_k[:, :, :32] = -prefix_k[:, :, :32].abs()  # z = 0 and M = 0 on the first 32 dims ...
    q[1, :, 3:9, :32] = q[1, :, 3:9, :32].abs() + 0.1  # ... the only dims where these queries are positive
    q[1, :, 3:9, 32:] = -q[1, :, 3:9, 32:].abs()
    kwargs = dict(feature_map="relu", key_padding_mask=mask, causal=True)
    term = memory_term(q, PlusLayer(prefix_k, tensors[4], tensors[5], "relu"), 64**-0.5)
    assert term[0, :, :5].abs().max() == 0 and term[1, :, 3:9].abs().max() == 0 and term.abs().max() > 0.1
    want, want_grads = _run(plus_reference, tensors, grad_out, torch.float64, **kwargs)
    got, got_grads = _run(plus_kernel, tensors, grad_out, torch.float32, **kwargs)
    _assert_close("o", got, want, 2e-5)
    for name, g, w in zip(_GRAD_NAMES, got_grads, want_grads, strict=True):
        _assert_close(name, g, w, 2e-5)


@pytest.mark.parametrize(("kernel", "name"), [("_plus_fwd", "o"), ("_plus_bwd_dq", "dq"), ("_plus_bwd_memory", "dq")])
def test_poisoning_catches_an_unwritten_buffer(poisoned, monkeypatch, kernel, name):
    # The harness must be able to fail: drop a kernel's launch and expect the check to notice (without the
    # memory pass, Delta stays NaN, which poisons dq first).
    class _NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(tpp, kernel, _NoLaunch())
    with pytest.raises(AssertionError, match=f"{name}: non-finite"):
        _check_case(Case(1, 1, 17, 5, 64, False, False, "elu1"), seed=0)


@pytest.mark.parametrize("frozen", ["sequence", "memory"])
def test_only_requested_gradients(poisoned, frozen):
    # Frozen q/k/v (the first layer of a frozen LM): only the memory pass runs, for dM, dz, dgate. Frozen prefix
    # and gate (e.g. LoRA only): the memory pass computes Delta alone (one column block, no partials).
    case = Case(2, 2, 17, 5, 80, True, True, "relu")
    tensors, grad_out, mask = _inputs(case, seed=11)
    trainable = [i >= 3 for i in range(6)] if frozen == "sequence" else [i < 3 for i in range(6)]
    leaves = [t.float().requires_grad_(trainable[i]) for i, t in enumerate(tensors)]
    kwargs = dict(feature_map="relu", key_padding_mask=mask, causal=True)
    plus_kernel(*leaves, **kwargs).backward(grad_out.float())
    ref = [t.clone().requires_grad_(trainable[i]) for i, t in enumerate(tensors)]
    plus_reference(*ref, **kwargs).backward(grad_out)
    for name, got, want, needed in zip(_GRAD_NAMES, leaves, ref, trainable, strict=True):
        if needed:
            _assert_close(name, got.grad, want.grad, 2e-5)
        else:
            assert got.grad is None, name


def test_strided_inputs_and_custom_scale(poisoned):
    # (B, L, H, D) memory viewed as (B, H, L, D), the layout HF attention modules hand over.
    gen = torch.Generator().manual_seed(3)
    batch, heads, seq_len, head_dim = 2, 2, 19, 64
    qkv = [torch.randn(batch, seq_len, heads, head_dim, generator=gen).transpose(1, 2) for _ in range(3)]
    prefix = [torch.randn(heads, 6, head_dim, generator=gen) for _ in range(2)]
    gate = torch.randn(heads, generator=gen)
    out = plus_kernel(*qkv, *prefix, gate, feature_map="elu1", causal=True, scale=0.3)
    want = plus_reference(*[t.double() for t in (*qkv, *prefix, gate)], feature_map="elu1", causal=True, scale=0.3)
    _assert_close("o", out, want, 2e-5)
    assert out.stride() == qkv[0].stride()


def test_plus_memory_matches_its_definition():
    gen = torch.Generator().manual_seed(2)
    keys, values = (torch.randn(3, 5, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    memory, norm = plus_memory(keys, values, "relu")
    torch.testing.assert_close(memory, torch.einsum("hpd,hpe->hde", keys.clamp(min=0), values))
    torch.testing.assert_close(norm, keys.clamp(min=0).sum(1))
    memory, norm = plus_memory(keys.half(), values.half(), "identity")
    assert norm is None and memory.dtype == torch.float32
    torch.testing.assert_close(memory.double(), torch.einsum("hpd,hpe->hde", keys.half().double(),
                                                             values.half().double()) / 5)  # fmt: skip
    with pytest.raises(ValueError, match="P >= 1"):
        plus_memory(keys[:, :0], values[:, :0], "elu1")


def _valid_inputs() -> dict:
    q = torch.randn(2, 2, 5, 64)
    return dict(q=q, k=q.clone(), v=q.clone(), memory=torch.randn(2, 64, 64), norm=torch.rand(2, 64),
                gate=torch.randn(2), feature_map="elu1")  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"feature_map": "softmax"}, "feature_map 'softmax'"),
        ({"memory": torch.randn(2, 64, 32)}, r"memory must be \(H, D, D\)"),
        ({"memory": torch.randn(2, 64, 64).double()}, "memory must be float32"),
        ({"norm": None}, r"norm must be \(H, D\)"),
        ({"feature_map": "identity"}, "pass norm=None"),
        ({"gate": torch.randn(3)}, r"gate must be \(H,\)"),
        ({"gate": torch.randn(2).half()}, "gate must be float32"),
        ({"k": torch.randn(2, 2, 64, 5).transpose(-1, -2)}, "contiguous last dim"),
        ({"v": torch.randn(2, 2, 5, 64).half()}, "v has dtype"),
        ({"mask": torch.ones(2, 5)}, "key_padding_mask must be bool"),
    ],
)
def test_rejects_bad_inputs(change: dict, message: str):
    inputs = _valid_inputs() | change
    mask = inputs.pop("mask", None)
    memory, norm, gate = inputs.pop("memory"), inputs.pop("norm"), inputs.pop("gate")
    with pytest.raises(ValueError, match=message):
        prefix_plus_attention(inputs.pop("q"), inputs.pop("k"), inputs.pop("v"), memory, norm, gate,
                              key_padding_mask=mask, **inputs)  # fmt: skip


def test_plus_config_validation():
    with pytest.raises(ValueError, match="block_e=24"):
        PlusConfig(_CONFIG.seq, block_r=16, block_c=16, block_e=24, splits=1)
    with pytest.raises(ValueError, match="splits must be >= 1"):
        PlusConfig(_CONFIG.seq, block_r=16, block_c=16, block_e=16, splits=0)


# ---------------------------------------------------------------------------------------------------
# the attention hook: Prefix-Tuning+ layers and the kernel
# ---------------------------------------------------------------------------------------------------


class FakeAttention(torch.nn.Module):
    def __init__(self, causal: bool, groups: int = 1):
        super().__init__()
        self.is_causal = causal
        self.num_key_value_groups = groups


def _plus_layer(causal: bool, hq: int = 2, hkv: int = 2, lq: int = 9, lk: int = 9, feature_map: str = "elu1"):
    gen = torch.Generator().manual_seed(8)
    b, d, p = 2, 16, 4
    q = torch.randn(b, hq, lq, d, generator=gen, requires_grad=True)
    k, v = (torch.randn(b, hkv, lk, d, generator=gen, requires_grad=True) for _ in range(2))
    kv = torch.randn(1, 2, hkv, p, d, generator=gen, requires_grad=True)
    gate = torch.randn(1, hq, generator=gen, requires_grad=True)
    pad = torch.ones(b, lk, dtype=torch.bool)
    pad[1, -3:] = False  # right padding: with causal, every query still sees key 0
    i = torch.arange(lq)[:, None] + (lk - lq)
    allowed = (torch.arange(lk)[None, :] <= i) if causal else torch.ones(lq, lk, dtype=torch.bool)
    mask = allowed[None, None] & pad[:, None, None, :]
    module = FakeAttention(causal, hq // hkv)
    attach(module, PrefixSlot(PrefixStore(active={"t": PlusState(kv, gate, feature_map)}), "t", 0))
    return module, (q, k, v, kv, gate), mask


@pytest.fixture
def fresh_log(monkeypatch):
    monkeypatch.setattr(attention, "_backend_logged", set())


@pytest.fixture
def kernel_calls(monkeypatch, fresh_log):
    """Record calls of the real (interpreted) ``prefix_plus_attention`` made by the hook."""
    calls = []

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return prefix_plus_attention(*args, **kwargs)

    monkeypatch.setattr(ptscale_kernels, "prefix_plus_attention", recording)  # the hook imports it per call
    return calls


@pytest.mark.parametrize(("causal", "feature_map", "padded"), [
    (False, "elu1", True), (True, "elu1", True), (False, "identity", True), (True, "relu", True),
    (True, "elu1", False), (False, "relu", False),
])  # fmt: skip
def test_hook_runs_plus_layers_through_the_kernel(kernel_calls, monkeypatch, causal, feature_map, padded):
    # On CPU choose_backend never picks the kernel (it runs on CUDA only); stand in for its answer and check
    # that the plus layer asks for the "plus" variant, calls the kernel with the sequence mask translated
    # into key padding (no mask: a causal model's mask is built, a bidirectional one's stays None), and gives
    # the torch path's output and gradients.
    chosen = []

    def choose(query, dropout, *, variant="classic"):
        chosen.append(variant)
        return "triton"

    module, leaves, mask = _plus_layer(causal, feature_map=feature_map)
    mask = mask if padded else None
    monkeypatch.setattr(attention, "choose_backend", choose)
    out, _ = prefix_attention_forward(module, *leaves[:3], mask, scaling=0.3)
    assert chosen == ["plus"] and len(kernel_calls) == 1
    (call,) = kernel_calls
    assert call["causal"] is causal and call["scale"] == 0.3 and call["feature_map"] == feature_map
    if padded:
        assert torch.equal(call["key_padding_mask"], mask[:, 0, -1, :])
    elif causal:
        assert call["key_padding_mask"].all() and call["key_padding_mask"].shape == (2, 9)
    else:
        assert call["key_padding_mask"] is None
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * g).sum(), leaves)

    monkeypatch.setattr(attention, "choose_backend", lambda *args, **kwargs: "reference")
    ref, _ = prefix_attention_forward(module, *leaves[:3], mask, scaling=0.3)
    assert len(kernel_calls) == 1
    ref_grads = torch.autograd.grad((ref * g).sum(), leaves)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_forced_triton_plus_layer_on_cpu_is_a_clear_error(monkeypatch, fresh_log):
    monkeypatch.setenv("PTSCALE_ATTENTION", "triton")
    module, leaves, mask = _plus_layer(True)
    with pytest.raises(RuntimeError, match=r"PTSCALE_ATTENTION=triton but the Triton Prefix-Tuning\+ kernel cannot "
                                           r"run: tensors on cpu"):  # fmt: skip
        prefix_attention_forward(module, *leaves[:3], mask, scaling=0.3)


def test_plus_torch_path_is_logged_once(monkeypatch, fresh_log, caplog):
    monkeypatch.delenv("PTSCALE_ATTENTION", raising=False)
    module, leaves, mask = _plus_layer(False)
    with caplog.at_level(logging.INFO, logger="ptscale.prefix.attention"):  # on a CPU the choice, said at INFO
        for _ in range(3):
            prefix_attention_forward(module, *leaves[:3], mask, scaling=0.3)
    assert [r.getMessage() for r in caplog.records] == [
        "Prefix-Tuning+ attention: torch path (SDPA + memory term); kernel unused: tensors on cpu "
        "(the Triton kernel runs on CUDA)"]


@pytest.mark.parametrize(("layer", "why"), [
    (dict(causal=True, lq=1, lk=9), "q_len != kv_len (decoding with a KV cache)"),
    (dict(causal=False, hq=4, hkv=2), "grouped-query attention"),
])  # fmt: skip
def test_plus_cases_outside_the_kernel_keep_the_torch_path(kernel_calls, monkeypatch, caplog, layer, why):
    monkeypatch.setenv("PTSCALE_ATTENTION", "triton")
    monkeypatch.setattr(attention, "choose_backend", lambda *args, **kwargs: "triton")
    module, leaves, mask = _plus_layer(**layer)
    with caplog.at_level(logging.WARNING, logger="ptscale.prefix.attention"):
        out, _ = prefix_attention_forward(module, *leaves[:3], mask, scaling=0.3)
        prefix_attention_forward(module, *leaves[:3], mask, scaling=0.3)
    assert not kernel_calls
    assert [r.getMessage() for r in caplog.records] == [
        f"Prefix-Tuning+ attention: torch path for {why} (the Triton kernel does not cover it)"]
    # ... and that path is still SDPA over the (repeated) sequence heads plus the memory term.
    k, v = (t.repeat_interleave(module.num_key_value_groups, 1) for t in leaves[1:3])
    base = torch.nn.functional.scaled_dot_product_attention(leaves[0], k, v, attn_mask=mask, scale=0.3)
    want = base + memory_term(leaves[0], getattr(module, attention.SLOT_ATTR).get(), 0.3)
    torch.testing.assert_close(out, want.transpose(1, 2), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# launchers/bench_prefix_attention.py: the Prefix-Tuning+ methods (timing needs a GPU)
# ---------------------------------------------------------------------------------------------------

_BENCH_PATH = Path(__file__).resolve().parents[2] / "launchers" / "bench_prefix_attention.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_prefix_attention_plus", _BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_bench_plus_flops_by_hand(bench):
    # B=2, H=3, L=10, D=8, bidirectional: attention 2*3*10*10*32 = 19200; memory 2*3*10*(2*8*8) = 7680.
    flops = bench.plus_attention_flops(2, 3, 10, 8, causal=False)
    assert flops["fwd"] == 19200 + 7680
    assert flops["bwd"] == 2.5 * 19200 + 3.0 * 7680
    assert flops["fwd_bwd"] == flops["fwd"] + flops["bwd"]
    shape = bench.BenchShape("s", 2, 3, 10, 4, 8, False, "fp32")
    assert bench.method_flops("plus_ours", shape) == bench.method_flops("plus_torch", shape) == flops
    assert bench.method_flops("ours", shape) == bench.attention_flops(2, 3, 10, 4, 8, causal=False)


def test_bench_plus_ratios_and_table(bench):
    def row(method: str, ms: float, extra: float) -> dict:
        return {"shape": "s", "method": method, "status": "ok", "ms_median": ms, "tflops": 1.0,
                "peak_mib": extra + 10, "extra_mib": extra}  # fmt: skip

    rows = [row("peft", 5.0, 200.0), row("sdpa_no_prefix", 1.0, 40.0), row("plus_ours", 1.25, 50.0),
            row("plus_torch", 2.5, 100.0)]  # fmt: skip
    bench.add_ratios(rows)
    ours = rows[2]
    assert ours["speedup_vs_plus_torch"] == pytest.approx(2.0) and ours["extra_mem_vs_plus_torch"] == 0.5
    assert ours["time_vs_no_prefix"] == pytest.approx(1.25) and "speedup_vs_peft" not in ours
    assert "speedup_vs_plus_torch" not in rows[0]
    assert "2.00x" in bench.format_table(rows)


def test_bench_plus_methods_and_check_run_on_cpu(bench):
    # The timed closures and the --check comparison, on CPU through the interpreter; every method must
    # produce gradients for all of its inputs (gate included).
    shape = bench.BenchShape("tiny", 1, 2, 17, 5, 64, True, "fp32", feature_map="relu")
    inputs = bench.make_inputs(shape, torch.device("cpu"))
    for method in bench.PLUS_METHODS:
        step, leaves = bench.METHOD_FNS[method](inputs, shape)
        step()
        assert len(leaves) == 6, method
        assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves), method
    errors = bench.check_plus_shape(inputs, shape)
    assert len(errors) == 14 and max(errors.values()) < 1e-4
    assert all(s.feature_map == "identity" for s in bench.bench_shapes(quick=True, feature_map="identity"))


# ---------------------------------------------------------------------------------------------------
# GPU compilation without a GPU
# ---------------------------------------------------------------------------------------------------

_COMPILE_SCRIPT = r"""
import contextlib
import io
import re
import sys
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import ptscale_kernels.triton_prefix_plus as tpp

launches = []


class Record:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))


PLUS_KERNELS = ("_plus_fwd", "_plus_bwd_memory", "_plus_bwd_dq")
for name in (*PLUS_KERNELS, "_attn_bwd_dkdv"):
    assert isinstance(getattr(tpp, name), triton.runtime.JITFunction), name
    setattr(tpp, name, Record(getattr(tpp, name)))
torch.cuda.get_device_properties = lambda device: type("Props", (), {"multi_processor_count": 132})()
POINTER = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.uint8: "*u8"}

for spec in sys.argv[1:]:
    batch, heads, seq_len, head_dim, dtype, causal, pad, feature_map = spec.split(",")
    batch, heads, seq_len, head_dim = map(int, (batch, heads, seq_len, head_dim))
    dtype, causal, pad = getattr(torch, dtype), causal == "causal", pad == "pad"
    feature = tpp.FEATURE_MAPS.index(feature_map)
    cfg = tpp.default_plus_config(batch, heads, seq_len, head_dim, dtype, torch.device("cuda"))
    q = torch.zeros(batch, heads, seq_len, head_dim, dtype=dtype)
    memory = torch.zeros(heads, head_dim, head_dim)
    norm = None if feature_map == "identity" else torch.zeros(heads, head_dim)
    gate = torch.zeros(heads)
    mask = torch.ones(batch, seq_len, dtype=torch.bool) if pad else None
    lse = torch.zeros(batch, heads, seq_len)
    launches.clear()
    tpp._forward(q, q, q, memory, norm, gate, mask, causal, 0.125, feature, cfg)
    tpp._backward(q, q, q, q, memory, norm, gate, mask, q, lse, causal, 0.125, feature, cfg)
    assert [kernel.__name__ for kernel, _, _ in launches] == ["_plus_fwd", "_plus_bwd_memory", "_attn_bwd_dkdv",
                                                              "_plus_bwd_dq"], launches
    for kernel, args, kwargs in launches:
        if kernel.__name__ not in PLUS_KERNELS:
            continue  # the classic dK/dV kernel, with the same tiles, is compiled by test_prefix_attention.py
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        signature = {}
        for arg_name, arg in zip(kernel.arg_names, args):
            if isinstance(arg, torch.Tensor):
                signature[arg_name] = POINTER[arg.dtype]
            else:
                signature[arg_name] = "fp32" if isinstance(arg, float) else "i32"
        signature |= {k: "constexpr" for k in kwargs}
        src = ASTSource(kernel, signature, constexprs=kwargs)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # ptxas -v output (TRITON_DUMP_PTXAS_LOG=1)
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        shared = compiled.metadata.shared
        spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", log.getvalue())]
        print(spec, kernel.__name__, "shared", shared, "spill stores", spills)
        assert shared <= 227 * 1024, f"{kernel.__name__}: {shared} bytes of shared memory"
        assert compiled.asm.get("cubin"), kernel.__name__
        assert spills == [0], f"{kernel.__name__}: ptxas spill stores {spills}"
print("compiled")
"""


@pytest.mark.slow
def test_plus_kernels_compile_for_sm90_without_spills():
    # Every Prefix-Tuning+ kernel as default_plus_config would launch it on an H100, compiled down to a cubin
    # with Triton's bundled ptxas (always compiled, so that ptxas reports its register use), in a process
    # where TRITON_INTERPRET is unset. The shapes are the benchmark's BLIP-2 LM and Q-Former, with padding.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"TRITON_DEFAULT_FP_FUSION": "1", "TRITON_ALWAYS_COMPILE": "1", "TRITON_DUMP_PTXAS_LOG": "1"}
    specs = ["64,32,64,80,bfloat16,causal,pad,elu1", "64,12,32,64,float32,bidir,pad,identity"]
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, *specs], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert proc.stdout.strip().endswith("compiled")
