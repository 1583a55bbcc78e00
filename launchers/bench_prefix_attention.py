"""Benchmark fused prefix attention, forward + backward, against the ways it is done without it.

Methods (each runs forward + backward with gradients for q, k, v and, where there is one, the prefix):
  ours            ptscale_kernels.prefix_attention: the (H, P, D) prefix read in place, never expanded
  peft            (a) the PEFT way: expand the prefix to the batch, concatenate with k / v, torch SDPA with
                  an explicit boolean mask (prefix_attention_reference); the mask is built outside the
                  timed region, as a model builds it once per forward, not once per layer
  sdpa_no_prefix  (b) torch SDPA over the same sequence with no prefix: the floor any prefix method pays on
  flash_concat    (c) flash-attn on the concatenated K/V; its bottom-right-aligned causal mask is exactly
                  "all prefix + causal". Recorded as "not installed" without flash_attn, "unsupported"
                  for fp32 (flash-attn has no fp32 kernels)
FlexAttention (a batch-1 prefix merged with the sequence by log-sum-exp) is not included.

Prefix-Tuning+ (the same P prefix keys / values as a gated linear-attention memory, feature map
--feature-map; gradients also for the per-head gate):
  plus_ours       ptscale_kernels: plus_memory (torch, (H, D, D)) + prefix_plus_attention (the sequence
                  flash-attention with the memory term fused into its epilogues)
  plus_torch      what the hook runs without the kernel: torch SDPA over the sequence + ptscale's
                  memory_term (a (B, H, L, D) term added to the output)

Timing: triton.testing.do_bench (CUDA events, the L2 cache flushed by a 256 MB write before every rep,
gradients reset outside the timed region), median of the reps after its warm-up; each method is timed
twice and both medians are recorded, so a difference between methods smaller than that spread reads as
noise (METHOD.md of the device tool). Memory: torch.cuda.max_memory_allocated over one forward + backward
(peak_mib), and the same minus what was allocated before the step (extra_mib: activations, workspace
and gradients). Ratios vs (a) and (b) are computed from rows of the same run.

--check compares each method, output and every gradient, with the reference run in float64 on upcast
inputs, as ||got - ref|| / ||ref||; a NaN or inf anywhere is a failure (exit status 1).

Usage:
  python launchers/bench_prefix_attention.py --check --out runs/bench_prefix_attention
  python launchers/bench_prefix_attention.py --quick --dtype bf16 --out /tmp/bench
Needs a CUDA GPU; without one it exits with status 2 and times nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from ptscale_kernels import (
    plus_memory,
    prefix_attention,
    prefix_attention_mask,
    prefix_attention_reference,
    prefix_plus_attention,
)

from ptscale.prefix.plus import FEATURE_MAPS, PlusLayer, memory_term

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PLUS_METHODS = ("plus_ours", "plus_torch")
METHODS = ("ours", "peft", "sdpa_no_prefix", "flash_concat", *PLUS_METHODS)
# --check: ||got - ref|| / ||ref|| allowed against the float64 reference (METHOD.md: fp32 far under 1e-3,
# tf32 near 3e-4, bf16 operands between 1e-3 and 1e-2); the margins cover gradients summed over long rows.
CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class BenchShape:
    name: str
    batch: int
    heads: int
    seq_len: int
    prefix_len: int
    head_dim: int
    causal: bool
    dtype: str  # key of DTYPES
    feature_map: str = "elu1"  # Prefix-Tuning+ methods only

    @property
    def label(self) -> str:
        return f"{self.name} L{self.seq_len} P{self.prefix_len} {self.dtype}"


def bench_shapes(quick: bool = False, dtype: str | None = None, feature_map: str = "elu1") -> list[BenchShape]:
    """The benchmark grid; `dtype` overrides each shape's own dtype; `feature_map` is for the plus_* methods."""
    shapes = [
        # BLIP-2 OPT-2.7B language model: hidden 2560 = 32 heads x 80; captions are short.
        *(BenchShape("blip2-opt2.7b", 64, 32, 64, p, 80, True, "bf16") for p in (8, 16)),
        # BLIP-2 Q-Former self-attention: 12 heads x 64, 32 query tokens, bidirectional, kept in fp32. Timed
        # without dropout: the kernel has none, so in training with attention dropout (the 2.7B preset's 0.1)
        # the hook runs these layers on the reference path and these rows describe eval / dropout-free runs.
        *(BenchShape("qformer", 64, 12, 32, p, 64, False, "fp32") for p in (8, 16)),
        # A 7B-class LM layer: 32 heads x 128.
        *(
            BenchShape("lm-d128", 8, 32, seq, p, 128, True, "bf16")
            for seq in (512, 1024, 2048, 4096)
            for p in (16, 32, 64)
        ),
    ]
    if quick:
        keep = {("blip2-opt2.7b", 64, 16), ("qformer", 32, 16), ("lm-d128", 1024, 32)}
        shapes = [s for s in shapes if (s.name, s.seq_len, s.prefix_len) in keep]
    if dtype is not None:
        shapes = [replace(s, dtype=dtype) for s in shapes]
    return [replace(s, feature_map=feature_map) for s in shapes]


def attention_flops(
    batch: int, heads: int, seq_len: int, prefix_len: int, head_dim: int, causal: bool
) -> dict[str, float]:
    """Useful matmul FLOPs of one attention call (the FlashAttention benchmark convention).

    Forward: S = Q K^T and O = P V, each 2 * D FLOPs per (query, visible key) pair, so
    4 * B * H * L * keys * D with keys = P + L (bidirectional) or P + L / 2 (causal: query i sees i + 1
    sequence keys, ~L / 2 on average; the prefix part is never halved).
    Backward: 2.5x the forward = 2.0 (dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q) + 0.5 (S recomputed).
    """
    keys = prefix_len + (seq_len / 2 if causal else seq_len)
    forward = 4.0 * batch * heads * seq_len * keys * head_dim
    backward = 2.5 * forward  # 2.0 (bwd) + 0.5 (recompute)
    return {"fwd": forward, "bwd": backward, "fwd_bwd": forward + backward}


def plus_attention_flops(batch: int, heads: int, seq_len: int, head_dim: int, causal: bool) -> dict[str, float]:
    """Prefix-Tuning+: the sequence attention (`attention_flops` with P = 0) plus the memory term.

    Memory forward: phi(s Q) M, 2 * D * D FLOPs per query, 2 * B * H * L * D^2 (the normaliser, a matvec,
    is not counted). Backward: 3.0x that: dM = phi^T (dO / den), M dO for d phi(q), and M dO once more for
    Delta in the memory-gradient pass. The P-sized M = phi(K)^T V is not counted (P << B * L).
    """
    flops = attention_flops(batch, heads, seq_len, 0, head_dim, causal)
    memory = 2.0 * batch * heads * seq_len * head_dim * head_dim
    forward, backward = flops["fwd"] + memory, flops["bwd"] + 3.0 * memory
    return {"fwd": forward, "bwd": backward, "fwd_bwd": forward + backward}


# ---------------------------------------------------------------------------------------------------
# methods: each returns (step, leaves); step() runs forward + backward once
# ---------------------------------------------------------------------------------------------------

Step = Callable[[], None]


@dataclass
class Inputs:
    q: torch.Tensor  # (B, H, L, D)
    k: torch.Tensor
    v: torch.Tensor
    prefix_k: torch.Tensor  # (H, P, D)
    prefix_v: torch.Tensor
    grad_out: torch.Tensor  # (B, H, L, D)
    gate: torch.Tensor  # (H,) fp32: the Prefix-Tuning+ gate (non-zero, so that the memory term counts)


def make_inputs(shape: BenchShape, device: torch.device, seed: int = 0) -> Inputs:
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[shape.dtype]
    seq = (shape.batch, shape.heads, shape.seq_len, shape.head_dim)
    pre = (shape.heads, shape.prefix_len, shape.head_dim)

    def randn(size: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(size, generator=gen, device=device, dtype=dtype)

    gate = torch.randn(shape.heads, generator=gen, device=device)
    return Inputs(randn(seq), randn(seq), randn(seq), randn(pre), randn(pre), randn(seq), gate)


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


def method_ours(inputs: Inputs, shape: BenchShape) -> tuple[Step, list[torch.Tensor]]:
    leaves = _leaves(inputs.q, inputs.k, inputs.v, inputs.prefix_k, inputs.prefix_v)

    def step() -> None:
        prefix_attention(*leaves, causal=shape.causal).backward(inputs.grad_out)

    return step, leaves


def method_peft(inputs: Inputs, shape: BenchShape) -> tuple[Step, list[torch.Tensor]]:
    leaves = _leaves(inputs.q, inputs.k, inputs.v, inputs.prefix_k, inputs.prefix_v)
    q, k, v, prefix_k, prefix_v = leaves
    mask = prefix_attention_mask(shape.batch, shape.seq_len, shape.prefix_len, causal=shape.causal, device=q.device)
    batch, heads, _, head_dim = q.shape

    def step() -> None:
        keys = torch.cat([prefix_k.unsqueeze(0).expand(batch, heads, shape.prefix_len, head_dim), k], dim=2)
        values = torch.cat([prefix_v.unsqueeze(0).expand(batch, heads, shape.prefix_len, head_dim), v], dim=2)
        F.scaled_dot_product_attention(q, keys, values, attn_mask=mask).backward(inputs.grad_out)

    return step, leaves


def method_sdpa_no_prefix(inputs: Inputs, shape: BenchShape) -> tuple[Step, list[torch.Tensor]]:
    leaves = _leaves(inputs.q, inputs.k, inputs.v)

    def step() -> None:
        F.scaled_dot_product_attention(*leaves, is_causal=shape.causal).backward(inputs.grad_out)

    return step, leaves


def flash_attn_status(dtype: torch.dtype) -> str:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "not installed"
    if dtype == torch.float32:
        return "unsupported: flash-attn has no fp32 kernels"
    return "ok"


def method_flash_concat(inputs: Inputs, shape: BenchShape) -> tuple[Step, list[torch.Tensor]]:
    from flash_attn import flash_attn_func

    # flash-attn's layout is (B, L, H, D); a model hands it over in that layout, so convert outside timing.
    leaves = _leaves(
        inputs.q.transpose(1, 2).contiguous(),
        inputs.k.transpose(1, 2).contiguous(),
        inputs.v.transpose(1, 2).contiguous(),
        inputs.prefix_k.transpose(0, 1).contiguous(),  # (P, H, D)
        inputs.prefix_v.transpose(0, 1).contiguous(),
    )
    q, k, v, prefix_k, prefix_v = leaves
    grad_out = inputs.grad_out.transpose(1, 2).contiguous()
    batch, _, heads, head_dim = q.shape

    def step() -> None:
        keys = torch.cat([prefix_k.unsqueeze(0).expand(batch, shape.prefix_len, heads, head_dim), k], dim=1)
        values = torch.cat([prefix_v.unsqueeze(0).expand(batch, shape.prefix_len, heads, head_dim), v], dim=1)
        # seqlen_k = P + L > seqlen_q = L: causal=True is bottom-right aligned, i.e. all prefix + causal.
        flash_attn_func(q, keys, values, causal=shape.causal).backward(grad_out)

    return step, leaves


PlusFn = Callable[..., torch.Tensor]  # (q, k, v, prefix_k, prefix_v, gate, *, feature_map, causal) -> o


def plus_ours(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
              gate: torch.Tensor, *, feature_map: str, causal: bool) -> torch.Tensor:
    memory, norm = plus_memory(prefix_k, prefix_v, feature_map)
    return prefix_plus_attention(q, k, v, memory, norm, gate, feature_map=feature_map, causal=causal)


def plus_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
               gate: torch.Tensor, *, feature_map: str, causal: bool) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out + memory_term(q, PlusLayer(prefix_k, prefix_v, gate, feature_map), q.shape[-1] ** -0.5)


def _plus_method(fn: PlusFn) -> Callable[[Inputs, BenchShape], tuple[Step, list[torch.Tensor]]]:
    def method(inputs: Inputs, shape: BenchShape) -> tuple[Step, list[torch.Tensor]]:
        leaves = _leaves(inputs.q, inputs.k, inputs.v, inputs.prefix_k, inputs.prefix_v, inputs.gate)

        def step() -> None:
            fn(*leaves, feature_map=shape.feature_map, causal=shape.causal).backward(inputs.grad_out)

        return step, leaves

    return method


METHOD_FNS = {
    "ours": method_ours,
    "peft": method_peft,
    "sdpa_no_prefix": method_sdpa_no_prefix,
    "flash_concat": method_flash_concat,
    "plus_ours": _plus_method(plus_ours),
    "plus_torch": _plus_method(plus_torch),
}


# ---------------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------------


def _zero_grads(leaves: list[torch.Tensor]) -> None:
    for t in leaves:
        t.grad = None


def time_step(step: Step, leaves: list[torch.Tensor], warmup_ms: float, rep_ms: float) -> list[float]:
    """Milliseconds of each forward + backward rep of triton.testing.do_bench: CUDA events, L2 flushed before
    every rep, gradients reset (grad_to_none) outside the timed region; warm-up and reps are in milliseconds."""
    from triton.testing import do_bench

    return list(do_bench(step, warmup=warmup_ms, rep=rep_ms, grad_to_none=leaves, return_mode="all"))


def measure_memory(step: Step, leaves: list[torch.Tensor]) -> tuple[int, int]:
    """(peak bytes allocated during one forward + backward, bytes allocated just before it)."""
    _zero_grads(leaves)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(), base


def rel_error(got: torch.Tensor | None, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64; inf when got has a NaN or inf (or is missing): never a pass."""
    if got is None or not bool(torch.isfinite(got).all()):
        return math.inf
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def worst_error(errors: dict[str, float], label: str) -> float:
    """The largest of ``label``'s errors; NaN counts as inf (Python's max() would skip a NaN not in first place)."""
    values = [v for k, v in errors.items() if k.startswith(f"{label}_")]
    if not values or any(math.isnan(v) for v in values):
        return math.inf
    return max(values)


def _errors(run, reference, methods: dict, names: tuple[str, ...], dtype: torch.dtype) -> dict[str, float]:
    """``{method}_err_{output or gradient}``: each method at ``dtype`` against ``reference`` in float64."""
    want = run(reference, torch.float64)
    return {f"{label}_err_{name}": rel_error(got, ref)
            for label, fn in methods.items() for name, got, ref in zip(names, run(fn, dtype), want, strict=True)}


def check_shape(inputs: Inputs, shape: BenchShape) -> dict[str, float]:
    """Relative error of ours and of the PEFT way, output and all gradients, vs the float64 reference."""
    names = ("o", "dq", "dk", "dv", "dprefix_k", "dprefix_v")
    tensors = (inputs.q, inputs.k, inputs.v, inputs.prefix_k, inputs.prefix_v)

    def run(fn, dtype: torch.dtype) -> list[torch.Tensor]:
        leaves = [t.detach().to(dtype).requires_grad_() for t in tensors]
        out = fn(*leaves, causal=shape.causal)
        out.backward(inputs.grad_out.to(dtype))
        return [out.detach(), *(t.grad for t in leaves)]

    return _errors(run, prefix_attention_reference, {"ours": prefix_attention, "peft": prefix_attention_reference},
                   names, DTYPES[shape.dtype])


def check_plus_shape(inputs: Inputs, shape: BenchShape) -> dict[str, float]:
    """Relative error of plus_ours and plus_torch, output and all gradients (the gate's included), vs
    plus_torch in float64 (every input upcast; the gate stays fp32 in the runs at ``dtype``, as in a model)."""
    names = ("o", "dq", "dk", "dv", "dprefix_k", "dprefix_v", "dgate")
    tensors = (inputs.q, inputs.k, inputs.v, inputs.prefix_k, inputs.prefix_v)

    def run(fn: PlusFn, dtype: torch.dtype) -> list[torch.Tensor]:
        leaves = [t.detach().to(dtype).requires_grad_() for t in tensors]
        gate_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        leaves.append(inputs.gate.detach().to(gate_dtype).requires_grad_())
        out = fn(*leaves, feature_map=shape.feature_map, causal=shape.causal)
        out.backward(inputs.grad_out.to(dtype))
        return [out.detach(), *(t.grad for t in leaves)]

    return _errors(run, plus_torch, {"plus_ours": plus_ours, "plus_torch": plus_torch}, names, DTYPES[shape.dtype])


def method_flops(method: str, shape: BenchShape) -> dict[str, float]:
    if method in PLUS_METHODS:
        return plus_attention_flops(shape.batch, shape.heads, shape.seq_len, shape.head_dim, shape.causal)
    prefix_len = 0 if method == "sdpa_no_prefix" else shape.prefix_len
    return attention_flops(shape.batch, shape.heads, shape.seq_len, prefix_len, shape.head_dim, shape.causal)


def bench_method(method: str, inputs: Inputs, shape: BenchShape, warmup: float, repeats: float) -> dict[str, object]:
    """``warmup`` and ``repeats`` are do_bench's warm-up and rep budgets, in milliseconds."""
    row: dict[str, object] = {"method": method}
    if method == "flash_concat":
        status = flash_attn_status(DTYPES[shape.dtype])
        if status != "ok":
            return row | {"status": status}
    flops = method_flops(method, shape)
    try:
        step, leaves = METHOD_FNS[method](inputs, shape)
        times = time_step(step, leaves, warmup, repeats)
        again = time_step(step, leaves, warmup, repeats)  # the same again: the spread of one method's timing
        peak, base = measure_memory(step, leaves)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return row | {"status": "out of memory"}
    ms = statistics.median(times)
    return row | {
        "status": "ok",
        "ms_median": ms,
        "ms_min": min(times),
        "ms_max": max(times),
        "ms_median_again": statistics.median(again),
        "reps": len(times),
        "flops_fwd_bwd": flops["fwd_bwd"],
        "tflops": flops["fwd_bwd"] / (ms * 1e-3) / 1e12,
        "peak_mib": peak / 2**20,
        "extra_mib": (peak - base) / 2**20,
    }


def add_ratios(rows: list[dict[str, object]]) -> None:
    """Per shape, compare every timed method with (a) peft and (b) sdpa_no_prefix of the same run; the
    Prefix-Tuning+ methods with plus_torch (not with peft, a different computation) and sdpa_no_prefix."""
    by_shape: dict[str, dict[str, dict[str, object]]] = {}
    for row in rows:
        by_shape.setdefault(str(row["shape"]), {})[str(row["method"])] = row
    for methods in by_shape.values():
        peft, plain, plus = methods.get("peft"), methods.get("sdpa_no_prefix"), methods.get("plus_torch")
        for name, row in methods.items():
            if row.get("status") != "ok":
                continue
            if name in PLUS_METHODS:
                if plus is not None and plus.get("status") == "ok":
                    row["speedup_vs_plus_torch"] = float(plus["ms_median"]) / float(row["ms_median"])
                    row["extra_mem_vs_plus_torch"] = float(row["extra_mib"]) / float(plus["extra_mib"])
            elif peft is not None and peft.get("status") == "ok":
                row["speedup_vs_peft"] = float(peft["ms_median"]) / float(row["ms_median"])
                row["extra_mem_vs_peft"] = float(row["extra_mib"]) / float(peft["extra_mib"])
            if plain is not None and plain.get("status") == "ok":
                row["time_vs_no_prefix"] = float(row["ms_median"]) / float(plain["ms_median"])


# ---------------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------------


def format_table(rows: list[dict[str, object]]) -> str:
    header = (
        f"{'shape':34s} {'method':15s} {'ms':>9s} {'TFLOP/s':>8s} {'peak MiB':>9s} {'extra MiB':>9s} "
        f"{'vs peft':>8s} {'vs noprefix':>11s} {'vs plus_torch':>13s}"
    )
    lines = [header, "-" * len(header)]

    def num(row: dict[str, object], key: str, fmt: str) -> str:
        return format(row[key], fmt) if key in row else "-"

    for row in rows:
        if row.get("status") != "ok":
            lines.append(f"{row['shape']!s:34s} {row['method']!s:15s} {row['status']}")
            continue
        cells = [
            num(row, "ms_median", "9.3f"),
            num(row, "tflops", "8.1f"),
            num(row, "peak_mib", "9.0f"),
            num(row, "extra_mib", "9.0f"),
            num(row, "speedup_vs_peft", "7.2f") + "x",
            num(row, "time_vs_no_prefix", "10.2f") + "x",
            num(row, "speedup_vs_plus_torch", "12.2f") + "x",
        ]
        lines.append(f"{row['shape']!s:34s} {row['method']!s:15s} " + " ".join(cells))
    return "\n".join(lines)


def write_results(out_dir: Path, meta: dict[str, object], rows: list[dict[str, object]]) -> Path:
    """Writes bench_prefix_attention.json and, next to it, a PNG of TFLOP/s and extra memory per shape."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "bench_prefix_attention.json"
    path.write_text(json.dumps(meta | {"rows": rows}, indent=2, default=str) + "\n")
    plot_results(rows, out_dir / "bench_prefix_attention.png")
    return path


def plot_results(rows: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(str(r["shape"]) for r in rows))
    methods = [m for m in METHODS if any(r["method"] == m and r.get("status") == "ok" for r in rows)]
    lookup = {(str(r["shape"]), str(r["method"])): r for r in rows if r.get("status") == "ok"}
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 0.9 * len(shapes)), 9), sharex=True)
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(shapes))]
        for ax, key in zip(axes, ("tflops", "extra_mib"), strict=True):
            ax.bar(
                xs,
                [float(lookup.get((s, method), {}).get(key, math.nan)) for s in shapes],
                width,
                label=method,
            )
    axes[0].set_ylabel("TFLOP/s (fwd + bwd)")
    axes[1].set_ylabel("extra memory, MiB (fwd + bwd)")
    axes[1].set_yscale("log")
    axes[0].legend()
    axes[1].set_xticks(range(len(shapes)), shapes, rotation=60, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_metadata(argv: list[str]) -> dict[str, object]:
    import triton

    try:
        import flash_attn

        flash_version = flash_attn.__version__
    except ImportError:
        flash_version = "not installed"
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "flash_attn": flash_version,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv[:1], *argv]),
        "flops_formula": "fwd = 4*B*H*L*(P + (L/2 if causal else L))*D; fwd+bwd = 3.5*fwd "
        "(bwd = 2.0 + 0.5 recompute); sdpa_no_prefix uses P = 0; plus_*: attention with P = 0 "
        "+ memory fwd 2*B*H*L*D^2, memory bwd 3x that",
        "timing": "triton.testing.do_bench: CUDA events, L2 flushed before every rep, median of reps after "
        "warm-up, measured twice (ms_median, ms_median_again); fwd + bwd",
        "check": "||got - ref|| / ||ref|| vs the float64 reference on upcast inputs; NaN/inf fails",
        "qformer_rows": "attention dropout 0: with dropout (2.7B preset: 0.1) training uses the reference path",
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="directory for bench_prefix_attention.json / .png")
    parser.add_argument("--quick", action="store_true", help="three shapes instead of the full grid")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="override every shape's dtype")
    parser.add_argument("--check", action="store_true", help="verify each shape against the reference first")
    parser.add_argument("--warmup", type=float, default=25.0, help="do_bench warm-up, milliseconds")
    parser.add_argument("--repeats", type=float, default=100.0, help="do_bench rep budget, milliseconds")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--feature-map", choices=FEATURE_MAPS, default="elu1",
                        help="Prefix-Tuning+ feature map of the plus_* methods")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench_prefix_attention: needs a CUDA GPU (torch.cuda.is_available() is False); nothing was timed",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cuda")
    meta = run_metadata(argv)
    print(f"{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  flash-attn {meta['flash_attn']}")
    rows: list[dict[str, object]] = []
    failed_checks: list[str] = []
    for i, shape in enumerate(bench_shapes(args.quick, args.dtype, args.feature_map)):
        inputs = make_inputs(shape, device, seed=i)  # fresh random inputs per shape
        base = {"shape": shape.label, **asdict(shape)}
        if args.check:
            tol = CHECK_TOLERANCE[DTYPES[shape.dtype]]
            checks = [(check_shape, "ours")] if set(args.methods) - set(PLUS_METHODS) else []
            checks += [(check_plus_shape, "plus_ours")] if set(args.methods) & set(PLUS_METHODS) else []
            passed = True
            for check, label in checks:
                errors = check(inputs, shape)
                worst = worst_error(errors, label)
                base |= errors
                passed = passed and worst <= tol
                print(f"check {shape.label}: {label} max rel err {worst:.2e} (tol {tol:.0e})")
            base |= {"check_tolerance": tol, "check_passed": passed}
            if not passed:
                failed_checks.append(shape.label)
        for method in args.methods:
            rows.append(base | bench_method(method, inputs, shape, args.warmup, args.repeats))
        del inputs
        torch.cuda.empty_cache()
    add_ratios(rows)
    print(format_table(rows))
    if args.out is not None:
        print(f"wrote {write_results(args.out, meta, rows)}")
    if failed_checks:
        print(f"check FAILED for: {', '.join(failed_checks)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
