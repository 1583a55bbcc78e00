"""Triton prefix attention vs. a float64 reference, under the Triton interpreter (see conftest.py).

Every case draws fresh seeded inputs, fills every buffer the kernels write with NaN first (so an
element a kernel forgets to write fails the comparison), and compares the output and all five
gradients against `prefix_attention_reference` run in float64.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
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
import torch.nn.functional as F
import triton
from ptscale_kernels import (
    KernelConfig,
    prefix_attention,
    prefix_attention_mask,
    prefix_attention_reference,
    triton_available,
)
from ptscale_kernels import triton_prefix_attention as tpa
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.interpreter import InterpretedFunction


@dataclass(frozen=True)
class Case:
    batch: int
    heads: int
    seq_len: int
    prefix_len: int
    head_dim: int
    causal: bool
    padding: bool
    dtype: torch.dtype = torch.float32
    config: KernelConfig | None = None

    def __str__(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        tag = "cfg" if self.config is not None else "default"
        return (
            f"B{self.batch}-H{self.heads}-L{self.seq_len}-P{self.prefix_len}-D{self.head_dim}-"
            f"{'causal' if self.causal else 'bidir'}-{'pad' if self.padding else 'nopad'}-{dtype}-{tag}"
        )


# Tiles are 16 under the interpreter (default_config), so L = 17 / 33 / 40 end in a ragged query and key
# block, P = 37 spans three prefix tiles with a ragged last one, and P = 1 / 5 / 8 sit inside one tile.
_FIXED = [
    Case(2, 2, 1, 1, 64, True, False),
    Case(2, 2, 17, 5, 64, False, True),
    Case(2, 2, 33, 37, 80, True, True),
    Case(2, 2, 33, 8, 64, False, False),
    Case(1, 2, 17, 16, 80, True, False),
    Case(2, 1, 33, 1, 64, False, True),
    Case(3, 2, 20, 37, 64, True, True),
    Case(1, 1, 40, 16, 128, True, True),
    Case(2, 1, 32, 16, 64, False, True),  # L and P multiples of the tile: only unmasked fast paths
    Case(2, 2, 33, 0, 64, True, True),  # no prefix: left padding leaves query 0 with no key at all
    Case(1, 2, 9, 128, 64, True, True),  # the longest prefix we promise: eight prefix tiles
]


def _random_cases(n: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    return [
        Case(
            batch=rng.randint(1, 3),
            heads=rng.randint(1, 2),
            seq_len=rng.randint(1, 40),
            prefix_len=rng.choice([1, 5, 8, 16, 37, rng.randint(1, 40)]),
            head_dim=rng.choice([64, 80]),
            causal=rng.random() < 0.5,
            padding=rng.random() < 0.5,
        )
        for _ in range(n)
    ]


_FP16 = [
    Case(2, 2, 33, 8, 64, True, True, torch.float16),
    Case(2, 2, 17, 37, 80, False, True, torch.float16),
    Case(1, 2, 40, 16, 64, True, False, torch.float16),
]

# Unequal tiles (block_m = 2 block_n, block_n1 = 2 block_m1, ...) exercise the diagonal-band bookkeeping
# that the all-16 interpreter default never hits; prefix_splits = 2 exercises uneven split shares.
_WIDE = KernelConfig(32, 16, 16, 16, 32, 32, 16, prefix_splits=2)
_CONFIGS = [
    Case(2, 2, 33, 37, 80, True, True, config=_WIDE),
    Case(2, 1, 50, 5, 64, False, True, config=_WIDE),
    Case(1, 2, 70, 20, 64, True, False, config=KernelConfig(64, 32, 32, 16, 64, 64, 32, prefix_splits=3)),
]

CASES = _FIXED + _random_cases(10, seed=20240611) + _FP16 + _CONFIGS


def _padding_mask(batch: int, seq_len: int, gen: torch.Generator, *, left: bool = False) -> torch.Tensor:
    # Batch 0: random holes; batch 1: right padding (whole key tiles padded); batch 2: random again.
    mask = torch.rand(batch, seq_len, generator=gen) < 0.7
    if batch > 1:
        mask[1] = torch.arange(seq_len) < seq_len // 4 + 1
    if left:
        mask[0] = torch.arange(seq_len) >= seq_len // 3
    return mask


def _inputs(case: Case, seed: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    shape = (case.batch, case.heads, case.seq_len, case.head_dim)
    prefix_shape = (case.heads, case.prefix_len, case.head_dim)
    tensors = [torch.randn(s, generator=gen, dtype=torch.float64) for s in (shape, shape, shape)]
    tensors += [torch.randn(prefix_shape, generator=gen, dtype=torch.float64) for _ in range(2)]
    grad_out = torch.randn(shape, generator=gen, dtype=torch.float64)
    mask = None
    if case.padding:
        mask = _padding_mask(case.batch, case.seq_len, gen, left=case.prefix_len == 0)
    return tensors, grad_out, mask


def _run(fn, tensors, grad_out, dtype, **kwargs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [t.detach().to(dtype).requires_grad_() for t in tensors]
    out = fn(*leaves, **kwargs)
    out.backward(grad_out.to(dtype))
    return out.detach(), [t.grad for t in leaves]


def _assert_close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values (an unwritten element stays NaN)"
    err = (got.double() - want).abs().max().item() if want.numel() else 0.0
    bound = tol * max(1.0, want.abs().max().item() if want.numel() else 0.0)
    assert err <= bound, f"{name}: max abs error {err:.3e} > {bound:.3e}"


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float32: 2e-5, torch.float16: 1e-2}[dtype]


def _check_case(case: Case, seed: int) -> None:
    tensors, grad_out, mask = _inputs(case, seed)
    want, want_grads = _run(
        prefix_attention_reference,
        tensors,
        grad_out,
        torch.float64,
        key_padding_mask=mask,
        causal=case.causal,
    )
    got, got_grads = _run(
        tpa._prefix_attention, tensors, grad_out, case.dtype,
        key_padding_mask=mask, causal=case.causal, config=case.config,
    )  # fmt: skip
    tol = _tolerance(case.dtype)
    _assert_close("o", got, want, tol)
    for name, g, w in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), got_grads, want_grads, strict=True):
        _assert_close(name, g, w, tol)


def test_interpreter_is_active():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert isinstance(tpa._attn_fwd, InterpretedFunction)
    assert isinstance(tpa._attn_bwd_dq, InterpretedFunction)
    assert triton_available("cpu")
    assert tpa.default_config(2, 2, 33, 5, 64, torch.float32, torch.device("cpu")).block_m == 16


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_float64_reference(case: Case, poisoned):
    _check_case(case, seed=zlib.crc32(str(case).encode()))


def test_poisoning_catches_an_unwritten_element(poisoned, monkeypatch):
    # The harness must be able to fail: drop the dK/dV kernel's stores and expect the check to notice.
    class _NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(tpa, "_attn_bwd_dkdv", _NoLaunch())
    with pytest.raises(AssertionError, match="dk: non-finite"):
        _check_case(Case(1, 1, 17, 5, 64, False, False), seed=0)


def test_custom_scale_and_strided_inputs(poisoned):
    # (B, L, H, D) memory viewed as (B, H, L, D), the layout HF attention modules hand over.
    gen = torch.Generator().manual_seed(3)
    batch, heads, seq_len, prefix_len, head_dim = 2, 2, 19, 6, 64
    qkv = [torch.randn(batch, seq_len, heads, head_dim, generator=gen).transpose(1, 2) for _ in range(3)]
    prefix = [torch.randn(heads, prefix_len, head_dim, generator=gen) for _ in range(2)]
    out = prefix_attention(*qkv, *prefix, causal=True, scale=0.3)
    want = prefix_attention_reference(*[t.double() for t in qkv + prefix], causal=True, scale=0.3)
    _assert_close("o", out, want, 2e-5)
    assert out.stride() == qkv[0].stride()
    assert out.transpose(1, 2).is_contiguous()


# Scores of 1e8 overflow exp2 in masked-out lanes (the interpreter's numpy warns); they are discarded.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
def test_padding_is_isolated(poisoned):
    # Padded keys are never attended and padded query rows (with dO = 0 there) feed nothing back: filling
    # padded positions of q, k, v with huge values must leave every real row and gradient unchanged.
    gen = torch.Generator().manual_seed(7)
    batch, heads, seq_len, prefix_len, head_dim = 2, 2, 21, 5, 64
    mask = torch.ones(batch, seq_len, dtype=torch.bool)
    mask[0, 13:] = False
    mask[1, ::3] = False
    qkv = [torch.randn(batch, heads, seq_len, head_dim, generator=gen) for _ in range(3)]
    prefix = [torch.randn(heads, prefix_len, head_dim, generator=gen) for _ in range(2)]
    grad_out = torch.randn(batch, heads, seq_len, head_dim, generator=gen) * mask[:, None, :, None]
    pad = ~mask[:, None, :, None]
    garbage = [t.masked_fill(pad, 1e4) for t in qkv]

    results = []
    for q, k, v in (qkv, garbage):
        out, grads = _run(prefix_attention, [q, k, v, *prefix], grad_out, torch.float32,
                          key_padding_mask=mask, causal=True)  # fmt: skip
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
        results.append((out, grads))
    (out_a, grads_a), (out_b, grads_b) = results
    real = mask[:, None, :, None]
    torch.testing.assert_close(out_a * real, out_b * real, atol=1e-5, rtol=1e-5)
    for g_a, g_b in zip(grads_a[:3], grads_b[:3], strict=True):
        torch.testing.assert_close(g_a * real, g_b * real, atol=1e-4, rtol=1e-4)
    for g_a, g_b in zip(grads_a[3:], grads_b[3:], strict=True):
        torch.testing.assert_close(g_a, g_b, atol=1e-4, rtol=1e-4)
    # Padded keys get exactly zero gradient.
    assert (grads_a[1] * pad).abs().max() == 0 and (grads_a[2] * pad).abs().max() == 0


def test_only_requested_gradients(poisoned):
    # Frozen q/k/v (as in the first layer of a frozen LM): only dprefix is computed.
    case = Case(2, 2, 17, 5, 64, True, True)
    tensors, grad_out, mask = _inputs(case, seed=11)
    prefix = [t.float().requires_grad_() for t in tensors[3:]]
    qkv = [t.float() for t in tensors[:3]]
    prefix_attention(*qkv, *prefix, key_padding_mask=mask, causal=True).backward(grad_out.float())
    ref_prefix = [t.clone().requires_grad_() for t in tensors[3:]]
    prefix_attention_reference(*tensors[:3], *ref_prefix, key_padding_mask=mask, causal=True).backward(grad_out)
    for got, want in zip(prefix, ref_prefix, strict=True):
        _assert_close("dprefix", got.grad, want.grad, 2e-5)
    assert all(t.grad is None for t in qkv)


_INTERPRETER_FILE = os.path.join("triton", "runtime", "interpreter.py")


def _inside_triton_interpreter() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.endswith(_INTERPRETER_FILE):
            return True
        frame = frame.f_back
    return False


class _Allocations(TorchDispatchMode):
    """Records the shape of every tensor an aten op produces, except the interpreter's own copies of
    kernel arguments (byte views of their storage, which a GPU launch does not make)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not _inside_triton_interpreter():
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, torch.Tensor):
                    self.shapes.append(tuple(t.shape))
        return out


def test_prefix_is_never_expanded_to_the_batch():
    # P > L, so a batch-expanded prefix (B, H, P, D) is larger than anything batch-sized we should make.
    batch, heads, seq_len, prefix_len, head_dim = 4, 2, 8, 40, 64
    gen = torch.Generator().manual_seed(5)
    qkv = [torch.randn(batch, heads, seq_len, head_dim, generator=gen).requires_grad_() for _ in range(3)]
    prefix = [torch.randn(heads, prefix_len, head_dim, generator=gen).requires_grad_() for _ in range(2)]
    mask = torch.ones(batch, seq_len, dtype=torch.bool)
    limit = batch * heads * prefix_len * head_dim

    def offending(shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        return [s for s in shapes if torch.Size(s).numel() >= limit]

    saved: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        with _Allocations() as fwd:
            out = prefix_attention(*qkv, *prefix, key_padding_mask=mask, causal=True)
    with _Allocations() as bwd:
        out.sum().backward()
    assert saved, "the autograd Function saved nothing?"
    assert offending(saved) == [] and offending(fwd.shapes) == [] and offending(bwd.shapes) == []
    assert (batch, heads, prefix_len, head_dim) not in fwd.shapes + bwd.shapes + saved

    # The same probe does see the reference's expanded, concatenated prefix.
    with _Allocations() as ref:
        prefix_attention_reference(*qkv, *prefix, key_padding_mask=mask, causal=True)
    assert (batch, heads, prefix_len + seq_len, head_dim) in offending(ref.shapes)


@pytest.mark.parametrize("causal", [False, True])
def test_reference_without_prefix_is_sdpa(causal: bool):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 13, 32, generator=gen, dtype=torch.float64) for _ in range(3))
    empty = torch.empty(3, 0, 32, dtype=torch.float64)
    got = prefix_attention_reference(q, k, v, empty, empty, causal=causal)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, is_causal=causal))

    mask = torch.rand(2, 13, generator=gen) < 0.6
    mask[:, 0] = True
    got = prefix_attention_reference(q, k, v, empty, empty, key_padding_mask=mask, causal=causal)
    allowed = mask[:, None, None, :].expand(2, 1, 13, 13)
    if causal:
        allowed = allowed & torch.ones(13, 13, dtype=torch.bool).tril()
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=allowed))


def test_reference_mask_layout():
    mask = prefix_attention_mask(1, 3, 2, key_padding_mask=torch.tensor([[True, False, True]]), causal=True)
    want = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask[0, 0], want)


def _valid_inputs() -> dict[str, torch.Tensor]:
    return {
        "q": torch.randn(2, 2, 5, 64),
        "k": torch.randn(2, 2, 5, 64),
        "v": torch.randn(2, 2, 5, 64),
        "prefix_k": torch.randn(2, 3, 64),
        "prefix_v": torch.randn(2, 3, 64),
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"q": torch.randn(2, 5, 64)}, r"q must be \(B, H, L, D\)"),
        ({"k": torch.randn(2, 2, 6, 64)}, "k and v must have q's shape"),
        (
            {"prefix_k": torch.randn(3, 3, 64), "prefix_v": torch.randn(3, 3, 64)},
            r"prefix_k must be \(H, P, D\)",
        ),
        ({"prefix_v": torch.randn(2, 4, 64)}, "prefix_v"),
        ({"v": torch.randn(2, 2, 5, 64, dtype=torch.float64)}, "dtype"),
        ({"prefix_k": torch.randn(2, 3, 64).half()}, "prefix_k has dtype"),
        ({"k": torch.randn(2, 2, 64, 5).transpose(-1, -2)}, "contiguous last dim"),
        ({"mask": torch.ones(2, 5)}, "key_padding_mask must be bool"),
        ({"mask": torch.ones(2, 6, dtype=torch.bool)}, "key_padding_mask must be bool"),
    ],
)
def test_rejects_bad_inputs(change: dict, message: str):
    inputs = _valid_inputs() | change
    mask = inputs.pop("mask", None)
    with pytest.raises(ValueError, match=message):
        prefix_attention(**inputs, key_padding_mask=mask)


def test_rejects_head_dim_over_128():
    q = torch.randn(1, 1, 5, 160)
    with pytest.raises(ValueError, match="head dim 160"):
        prefix_attention(q, q, q, torch.randn(1, 2, 160), torch.randn(1, 2, 160))


def test_kernel_config_validation():
    with pytest.raises(ValueError, match="power of two"):
        KernelConfig(24, 16, 16, 16, 16, 16, 16, prefix_splits=1)
    with pytest.raises(ValueError, match="block_n must divide block_m"):
        KernelConfig(16, 32, 16, 16, 16, 16, 16, prefix_splits=1)


def test_package_imports_nothing_from_ptscale():
    root = os.path.dirname(ptscale_kernels.__file__)
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(root, name)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            for module in modules:
                assert module != "ptscale" and not module.startswith("ptscale."), f"{name} imports {module}"


# ---------------------------------------------------------------------------------------------------
# launchers/bench_prefix_attention.py: everything but the timing (no GPU here)
# ---------------------------------------------------------------------------------------------------

_BENCH_PATH = Path(__file__).resolve().parents[2] / "launchers" / "bench_prefix_attention.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_prefix_attention", _BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_bench_flops_by_hand(bench):
    # B=2, H=3, L=10, P=4, D=8. Bidirectional: every query sees 4 + 10 keys; QK^T and PV are 2*D each.
    flops = bench.attention_flops(2, 3, 10, 4, 8, causal=False)
    assert flops["fwd"] == 2 * 3 * 10 * 14 * (2 * 8 + 2 * 8)
    assert flops["bwd"] == 2.5 * flops["fwd"] and flops["fwd_bwd"] == 3.5 * flops["fwd"]
    # Causal halves the sequence part only: 4 + 10 / 2 = 9 keys per query on average.
    assert bench.attention_flops(2, 3, 10, 4, 8, causal=True)["fwd"] == 2 * 3 * 10 * 9 * 32
    assert bench.attention_flops(2, 3, 10, 0, 8, causal=True)["fwd"] == 2 * 3 * 10 * 5 * 32


def test_bench_shape_grid(bench):
    shapes = bench.bench_shapes()
    assert len(shapes) == 2 + 2 + 12
    blip = [s for s in shapes if s.name == "blip2-opt2.7b"]
    assert {(s.batch, s.heads, s.head_dim, s.seq_len, s.causal, s.dtype) for s in blip} == {
        (64, 32, 80, 64, True, "bf16")
    }
    assert sorted(s.prefix_len for s in blip) == [8, 16]
    qformer = [s for s in shapes if s.name == "qformer"]
    assert {(s.batch, s.heads, s.head_dim, s.seq_len, s.causal, s.dtype) for s in qformer} == {
        (64, 12, 64, 32, False, "fp32")
    }
    lm = [s for s in shapes if s.name == "lm-d128"]
    assert {(s.seq_len, s.prefix_len) for s in lm} == {(L, P) for L in (512, 1024, 2048, 4096) for P in (16, 32, 64)}
    assert all((s.batch, s.heads, s.head_dim, s.causal, s.dtype) == (8, 32, 128, True, "bf16") for s in lm)
    quick = bench.bench_shapes(quick=True, dtype="fp16")
    assert 2 <= len(quick) <= 4 and {s.dtype for s in quick} == {"fp16"}
    assert {s.name for s in quick} == {"blip2-opt2.7b", "qformer", "lm-d128"}


def test_bench_ratios_table_and_json(bench, tmp_path):
    def row(method: str, ms: float, extra: float) -> dict:
        return {"shape": "s", "method": method, "status": "ok", "ms_median": ms, "tflops": 1.0,
                "peak_mib": extra + 10, "extra_mib": extra}  # fmt: skip

    rows = [row("ours", 2.0, 50.0), row("peft", 5.0, 200.0), row("sdpa_no_prefix", 1.6, 40.0)]
    rows.append({"shape": "s", "method": "flash_concat", "status": "not installed"})
    bench.add_ratios(rows)
    assert rows[0]["speedup_vs_peft"] == pytest.approx(2.5)
    assert rows[0]["time_vs_no_prefix"] == pytest.approx(1.25)
    assert rows[0]["extra_mem_vs_peft"] == pytest.approx(0.25)
    assert "speedup_vs_peft" not in rows[3]
    table = bench.format_table(rows)
    assert "not installed" in table and "2.50x" in table

    meta = {"device": "test", "command": "x"}
    path = bench.write_results(tmp_path / "out", meta, rows)
    data = json.loads(path.read_text())
    assert data["device"] == "test" and len(data["rows"]) == 4
    assert (tmp_path / "out" / "bench_prefix_attention.png").stat().st_size > 0


def test_bench_methods_and_check_run_on_cpu(bench):
    # The timed closures and the --check comparison, on CPU through the interpreter (timing itself needs
    # CUDA events). Every method must produce gradients for all of its inputs.
    shape = bench.BenchShape("tiny", 2, 2, 17, 5, 64, True, "fp32")
    inputs = bench.make_inputs(shape, torch.device("cpu"))
    for method in ("ours", "peft", "sdpa_no_prefix"):
        step, leaves = bench.METHOD_FNS[method](inputs, shape)
        step()
        assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves), method
    errors = bench.check_shape(inputs, shape)
    assert len(errors) == 12 and max(errors.values()) < 1e-4
    assert bench.flash_attn_status(torch.float32) in (
        "not installed",
        "unsupported: flash-attn has no fp32 kernels",
    )


def test_bench_check_fails_on_nan_anywhere(bench, monkeypatch):
    # Python's max() skips a NaN unless it comes first; the check must not.
    assert bench.worst_error({"ours_err_o": 1e-6, "ours_err_dq": float("nan"), "peft_err_o": 0.0}, "ours") == math.inf
    assert bench.worst_error({"ours_err_o": 2e-6, "ours_err_dq": 1e-6}, "ours") == 2e-6
    assert bench.rel_error(torch.tensor([1.0, float("nan")]), torch.ones(2)) == math.inf
    assert bench.rel_error(None, torch.ones(2)) == math.inf
    # A kernel that leaves one element of one output NaN fails the shape's check.
    shape = bench.BenchShape("tiny", 1, 2, 9, 3, 16, True, "fp32")
    inputs = bench.make_inputs(shape, torch.device("cpu"))
    real = bench.prefix_attention

    def leaky(*args, **kwargs):
        out = real(*args, **kwargs)
        return out + torch.zeros_like(out).index_put_((torch.tensor([0]),) * 4, torch.tensor([float("nan")]))

    monkeypatch.setattr(bench, "prefix_attention", leaky)
    errors = bench.check_shape(inputs, shape)
    assert errors["ours_err_o"] == math.inf and bench.worst_error(errors, "ours") == math.inf
    assert bench.worst_error(errors, "peft") < 1e-5


def test_bench_refuses_to_run_without_cuda(bench, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--quick", "--check"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_bench_script_exit_status_without_cuda():
    env = os.environ | {"CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, str(_BENCH_PATH), "--quick"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "needs a CUDA GPU" in proc.stderr


# ---------------------------------------------------------------------------------------------------
# GPU compilation without a GPU: the interpreter accepts programs the compiler rejects
# ---------------------------------------------------------------------------------------------------

_COMPILE_SCRIPT = r"""
import sys
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import ptscale_kernels.triton_prefix_attention as tpa

launches = []


class Record:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))


for name in ("_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dprefix", "_attn_bwd_dq"):
    assert isinstance(getattr(tpa, name), triton.runtime.JITFunction), name
    setattr(tpa, name, Record(getattr(tpa, name)))
torch.cuda.get_device_properties = lambda device: type("Props", (), {"multi_processor_count": 132})()
tpa._capability = lambda device: (9, 0)
POINTER = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.uint8: "*u8"}

for spec in sys.argv[1:]:
    batch, heads, seq_len, prefix_len, head_dim, dtype, causal, pad, *candidate = spec.split(",")
    batch, heads, seq_len, prefix_len, head_dim = map(int, (batch, heads, seq_len, prefix_len, head_dim))
    dtype, causal, pad = getattr(torch, dtype), causal == "causal", pad == "pad"
    shape = (batch, heads, seq_len, prefix_len, head_dim, dtype, torch.device("cuda"))
    if candidate:  # "cand=i": the i-th sm_90 tile candidate instead of the default
        cfg = tpa.candidate_config(tpa.SM90_CANDIDATES[int(candidate[0].removeprefix("cand="))], *shape)
    else:
        cfg = tpa.default_config(*shape)
    q = torch.zeros(batch, heads, seq_len, head_dim, dtype=dtype)
    prefix = torch.zeros(heads, prefix_len, head_dim, dtype=dtype)
    mask = torch.ones(batch, seq_len, dtype=torch.bool) if pad else None
    lse = torch.zeros(batch, heads, seq_len)
    launches.clear()
    tpa._forward(q, q, q, prefix, prefix, mask, causal, 0.125, cfg)
    tpa._backward(q, q, q, q, prefix, prefix, mask, q, lse, causal, 0.125, cfg)
    assert len(launches) == 5, len(launches)
    for kernel, args, kwargs in launches:
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        signature = {}
        for arg_name, arg in zip(kernel.arg_names, args):
            if isinstance(arg, torch.Tensor):
                signature[arg_name] = POINTER[arg.dtype]
            else:
                signature[arg_name] = "fp32" if isinstance(arg, float) else "i32"
        signature |= {k: "constexpr" for k in kwargs}
        src = ASTSource(kernel, signature, constexprs=kwargs)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        shared = compiled.metadata.shared
        print(spec, kernel.__name__, "shared", shared)
        assert shared <= 227 * 1024, f"{kernel.__name__}: {shared} bytes of shared memory"
        assert compiled.asm.get("cubin"), kernel.__name__
print("compiled")
"""


def test_kernels_compile_for_sm90():
    # Compile every kernel, as the default config would launch it on an H100, down to a cubin with
    # Triton's bundled ptxas, in a process where TRITON_INTERPRET is unset.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    specs = ["4,2,64,16,80,bfloat16,causal,pad", "4,2,32,8,64,float32,bidir,nopad"]
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, *specs], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert proc.stdout.strip().endswith("compiled")


@pytest.mark.slow
def test_sm90_candidates_compile_at_the_training_shapes():
    # Every tile candidate `launchers/gpu_check.py tune` may pick, at the shapes training launches: BLIP-2
    # OPT-2.7B (bf16, D = 80 as 64 + 16, causal, padded, 32 query + ~30 text tokens) and the Q-Former
    # (12 heads x 64, 32 queries, bidirectional, fp16 as under autocast). A candidate that does not fit in
    # shared memory or fails to compile must not reach a GPU's few minutes.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    specs = [f"16,32,64,8,80,bfloat16,causal,pad,cand={i}" for i in range(len(tpa.SM90_CANDIDATES))]
    specs += [f"16,12,32,8,64,float16,bidir,pad,cand={i}" for i in range(len(tpa.SM90_CANDIDATES))]
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, *specs], env=env, capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert proc.stdout.strip().endswith("compiled")


def test_sm90_table_is_fixed_per_shape_class(monkeypatch, tmp_path):
    # A measured entry for the class is used as is (no timing at run time); other classes keep the heuristic.
    table = tmp_path / "tuned_sm90.json"
    table.write_text(json.dumps({"classes": {"bfloat16/d80/L64": {"tiles": list(tpa.SM90_CANDIDATES[1])}}}))
    monkeypatch.setattr(tpa, "TUNED_SM90_FILE", str(table))
    monkeypatch.setattr(tpa, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(tpa, "_multiprocessor_count", lambda device: 132)
    tpa.tuned_sm90.cache_clear()
    try:
        cuda = torch.device("cuda")
        assert tpa.shape_class(50, 80, torch.bfloat16) == "bfloat16/d80/L64"
        got = tpa.default_config(16, 32, 50, 8, 80, torch.bfloat16, cuda)
        assert got == tpa.candidate_config(tpa.SM90_CANDIDATES[1], 16, 32, 50, 8, 80, torch.bfloat16, cuda)
        assert (got.block_m, got.block_n, got.bwd_warps, got.num_stages) == (64, 64, 8, 3)
        launch = tpa.describe_launch(16, 32, 50, 8, 80, torch.bfloat16, cuda)
        assert launch["source"] == "tuned_sm90.json" and launch["head_dim_work"] == 80
        other = tpa.default_config(4, 32, 1024, 32, 128, torch.bfloat16, cuda)
        assert other == tpa._heuristic_config(4, 32, 1024, 32, 128, torch.bfloat16, cuda)
        assert tpa.describe_launch(4, 32, 1024, 32, 128, torch.bfloat16, cuda)["source"] == "heuristic"
    finally:
        tpa.tuned_sm90.cache_clear()


# ---------------------------------------------------------------------------------------------------
# head dim 80 (OPT-2.7B) runs as 64 + 16, not padded to 128
# ---------------------------------------------------------------------------------------------------


def test_head_dim_parts():
    assert tpa.head_dim_parts(80) == (64, 16, True) and tpa.head_dim_work(80) == 80
    assert tpa.head_dim_parts(96) == (64, 32, True) and tpa.head_dim_work(96) == 96
    assert tpa.head_dim_parts(64)[::2] == (64, False) and tpa.head_dim_work(64) == 64
    assert tpa.head_dim_work(112) == 128  # 64 + 64 would save nothing over one 128-wide tile
    for d in range(1, 129):
        block_d, block_d2, split = tpa.head_dim_parts(d)
        for width in (block_d, block_d2):
            assert width >= 16 and width & (width - 1) == 0, (d, width)  # tl.dot / tl.arange need these
        work = tpa.head_dim_work(d)
        assert d <= work <= max(16, triton.next_power_of_2(d)), d
        assert not split or work < triton.next_power_of_2(d), d  # a split only where it saves work


def test_head_dim_80_launches_do_80_wide_work(monkeypatch, poisoned):
    # Every launch of the forward and the four backward kernels at D = 80 runs its dots over 64 + 16 columns
    # (the FLOPs of D = 80), and the result still matches the float64 reference (NaN-poisoned outputs: the
    # second part's columns must be written too).
    launches = []

    class Record:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((self.kernel.__name__, kwargs))
                return self.kernel[grid](*args, **kwargs)

            return launch

    for name in ("_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dprefix", "_attn_bwd_dq"):
        monkeypatch.setattr(tpa, name, Record(getattr(tpa, name)))
    monkeypatch.setattr(tpa, "_interpreting", lambda: True)  # it looks for the interpreted _attn_fwd, now wrapped
    _check_case(Case(2, 2, 21, 5, 80, True, True), seed=80)
    assert len(launches) == 5
    for name, kwargs in launches:
        assert kwargs["HEAD_DIM"] == 80 and kwargs["SPLIT"] is True, name
        assert kwargs["BLOCK_D"] + kwargs["BLOCK_D2"] == 80, name
