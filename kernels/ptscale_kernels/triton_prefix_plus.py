"""Prefix-Tuning+ attention in Triton: softmax attention over the sequence plus a gated linear-attention
memory read-out, fused.

Math (per query head h, query row i, softmax scale s, feature map phi):

    o_i = SoftmaxAttn(q_i, K_seq, V_seq) + gate_h * m_i
    elu1 / relu:  m_i = phi(s q_i)^T M_h / (phi(s q_i)^T z_h + eps)      eps = 1e-6
                  M_h = sum_j phi(k_j) v_j^T  (D, D),  z_h = sum_j phi(k_j)  (D,)
    identity:     m_i = (s q_i)^T M_h,  M_h = sum_j k_j v_j^T / P  (no normaliser)

over the P prefix keys / values (k_j, v_j) of head h. The memory sees no mask (causality and key padding
concern the sequence only). This is the definition of ``ptscale.prefix.plus`` (which this package does
not import); with relu the normaliser may be 0, then the numerator is 0 too and m_i = 0 (eps keeps the
division finite).

Split of the work
-----------------
* torch (`plus_memory`): M and z from the (H, P, D) prefix, in fp32, with autograd, so the prefix
  gradients follow from dM and dz. They are (H, D, D) and (H, D): tiny, batch-free.
* forward kernel: the sequence flash-attention of `triton_prefix_attention` (P = 0: no prefix tiles),
  then, in the epilogue, the memory term added to the normalised accumulator:
  acc += diag(gate / den) phi(s Q) M, den = phi(s Q) z + eps. No (B, H, L, D) memory tensor exists;
  LSE is that of the sequence softmax alone.
* backward, with u_i = dO_i, w_i = M u_i and c_i = u_i . m_i = phi(s q_i) . w_i / den_i:
    - memory pass (replaces the classic Delta preprocess): per row, Delta_i = rowsum((O_i - gate m_i) * u_i)
      (the softmax part of O only), and the reductions over all B * L queries of a head
          dM = sum_i phi(s q_i) (gate u_i / den_i)^T,  dz = -sum_i phi(s q_i) gate c_i / den_i,
          dgate = sum_i c_i,
      one program per (head, split, block of dM columns) over a fixed share of the (batch, row block)
      items, each writing fp32 partials that torch sums: deterministic, no atomics, the partial buffer
      (splits, H, D, D) independent of the batch (splits ~ 4 * SMs / H).
    - dK/dV: the classic sequence kernel `_attn_bwd_dkdv`, unchanged (it only needs LSE and Delta).
    - dQ: the classic sequence loop, then the memory part in the epilogue:
          dq_i += s * gate / den_i * phi'(s q_i) * (w_i - c_i z)     (identity: s * gate * w_i).
Every product with M (and dM) runs in fp32 (tf32 when torch's fp32 matmul precision allows it, as torch
would), contracting BLOCK_C head-dim columns at a time so that no (D, D) operand sits in registers; phi(s q)
is recomputed wherever it is needed, never stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ptscale_kernels.triton_prefix_attention import (
    LOG2E,
    KernelConfig,
    _attn_bwd_dkdv,
    _attn_bwd_dq_sequence,
    _attn_fwd_sequence,
    _dot_precision,
    _finish_rows,
    _heuristic_config,
    _load_rows,
    _multiprocessor_count,
    _pad_args,
    _pow2_at_least_16,
    _store_rows,
    _strides3,
    triton_available,
)

FEATURE_MAPS = ("elu1", "relu", "identity")  # index = the kernels' FEATURE constant (2: identity)
EPS = 1e-6


# ---------------------------------------------------------------------------------------------------
# jit helpers
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _phi(x, FEATURE: tl.constexpr):
    if FEATURE == 0:
        # elu(x) + 1; exp of the clamped value, so the branch tl.where discards cannot overflow
        y = tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    elif FEATURE == 1:
        y = tl.maximum(x, 0.0)
    else:
        y = x
    return y


@triton.jit
def _phi_grad(x, FEATURE: tl.constexpr):
    # d phi / dx for elu1 (0) and relu (1), with torch's values at x = 0: elu' = exp(0) = 1, relu' = 0.
    if FEATURE == 0:
        y = tl.where(x > 0, 1.0, tl.exp(tl.minimum(x, 0.0)))
    else:
        y = tl.where(x > 0, 1.0, 0.0)
    return y


@triton.jit
def _inv_den(
    x_base,
    offs_r,
    stride_r,
    n_rows,
    scale,
    norm_base,
    eps,
    HEAD_DIM: tl.constexpr,
    BLOCK_C: tl.constexpr,
    FEATURE: tl.constexpr,
):
    # 1 / (phi(s q) . z + eps) per row (identity: 1, no normaliser), from BLOCK_C-column slices of q reloaded
    # from memory, so that no full (rows, D) fp32 feature tile has to be live next to the accumulators.
    inv = tl.zeros([offs_r.shape[0]], dtype=tl.float32)
    if FEATURE == 2:
        inv += 1.0
    else:
        for c in range(0, HEAD_DIM, BLOCK_C):
            offs_c = c + tl.arange(0, BLOCK_C)
            x = tl.load(x_base + offs_r[:, None] * stride_r + offs_c[None, :],
                        mask=(offs_r[:, None] < n_rows) & (offs_c[None, :] < HEAD_DIM), other=0.0)
            # Padded columns: phi(0) may be 1 (elu1), but z loads as 0 there.
            z = tl.load(norm_base + offs_c, mask=offs_c < HEAD_DIM, other=0.0)
            inv += tl.sum(_phi(x.to(tl.float32) * scale, FEATURE) * z[None, :], 1)
        inv = 1.0 / (inv + eps)
    return inv


@triton.jit
def _memory_dot(
    acc,
    x_base,
    offs_r,
    stride_r,
    n_rows,
    row_scale,
    x_scale,
    mem_base,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
    FEATURE: tl.constexpr,
    TRANS_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # acc (rows, BLOCK_D) += diag(row_scale) A @ (M or M^T), with A = phi(x_scale X) if FEATURE >= 0 else X,
    # X a (rows, HEAD_DIM) row-major block and M the (HEAD_DIM, HEAD_DIM) memory of one head. The head dim
    # is contracted BLOCK_C columns at a time, reloading X's columns from memory: an fp32 dot on FMA units
    # holds both operands in registers, and a whole (BLOCK_D, BLOCK_D) M would spill. Padded entries of M
    # load as 0, so phi(0) = 1 in padded columns of A adds nothing.
    offs_d = tl.arange(0, BLOCK_D)
    for c in range(0, HEAD_DIM, BLOCK_C):
        offs_c = c + tl.arange(0, BLOCK_C)
        a_ptrs = x_base + offs_r[:, None] * stride_r + offs_c[None, :]
        a = tl.load(a_ptrs, mask=(offs_r[:, None] < n_rows) & (offs_c[None, :] < HEAD_DIM), other=0.0)
        a = a.to(tl.float32)
        if FEATURE >= 0:
            a = _phi(a * x_scale, FEATURE)
        a = a * row_scale[:, None]
        mem_mask = (offs_c[:, None] < HEAD_DIM) & (offs_d[None, :] < HEAD_DIM)
        if TRANS_M:
            m = tl.load(mem_base + offs_d[None, :] * HEAD_DIM + offs_c[:, None], mask=mem_mask, other=0.0)
        else:
            m = tl.load(mem_base + offs_c[:, None] * HEAD_DIM + offs_d[None, :], mask=mem_mask, other=0.0)
        acc = tl.dot(a, m, acc, input_precision=PRECISION)
    return acc


# ---------------------------------------------------------------------------------------------------
# forward kernel
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _plus_fwd(
    Q, K, V, PAD, MEM, NORM, GATE, Out, LSE,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_padb,
    stride_ob, stride_oh, stride_om,
    H, L,
    qk_scale, scale, eps,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr,
    FEATURE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    MEM_PRECISION: tl.constexpr,
):  # fmt: skip
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    pad_base = PAD + off_b * stride_padb

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_base, offs_m, offs_d, stride_qm, L, HEAD_DIM, BLOCK_D, True)
    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # This kernel keeps the head dim in one padded tile (no second part): the shared helpers get 16-wide
    # dummies for their second-part arguments, which no code reads (SPLIT=False).
    no_d2 = BLOCK_D + tl.arange(0, 16)
    acc, acc_unused, l_i, m_i = _attn_fwd_sequence(
        acc, tl.zeros([BLOCK_M, 16], dtype=tl.float32), l_i, m_i, q, tl.zeros([BLOCK_M, 16], dtype=q.dtype),
        k_base, v_base, stride_kn, stride_vn, pad_base, offs_m, offs_d, no_d2, start_m, L, qk_scale,
        HEAD_DIM, BLOCK_D, 16, False, BLOCK_M, BLOCK_N, CAUSAL, HAS_PAD, DOT_PRECISION,
    )  # fmt: skip
    acc, lse = _finish_rows(acc, l_i, m_i)
    tl.store(LSE + off_bh.to(tl.int64) * L + offs_m, lse, mask=offs_m < L)

    # Epilogue: acc += diag(gate / den) phi(s Q) M, accumulated straight into the softmax output.
    inv_den = _inv_den(q_base, offs_m, stride_qm, L, scale, NORM + off_h * HEAD_DIM, eps, HEAD_DIM, BLOCK_C, FEATURE)
    row_scale = tl.load(GATE + off_h) * inv_den
    acc = _memory_dot(
        acc, q_base, offs_m, stride_qm, L, row_scale, scale, MEM + off_h * HEAD_DIM * HEAD_DIM,
        HEAD_DIM, BLOCK_D, BLOCK_C, FEATURE, False, MEM_PRECISION,
    )  # fmt: skip
    o_base = Out + off_b * stride_ob + off_h * stride_oh
    _store_rows(o_base, acc.to(Out.dtype.element_ty), offs_m, offs_d, stride_om, L, HEAD_DIM, BLOCK_D)


# ---------------------------------------------------------------------------------------------------
# backward kernels
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _plus_bwd_memory(
    Q, Out, DO, MEM, NORM, GATE, DELTA, DMEM_PART, DNORM_PART, DGATE_PART,
    stride_qb, stride_qh, stride_qm,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    H, L,
    n_row_blocks, total_items, items_per_split,
    scale, eps,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_E: tl.constexpr,
    FEATURE: tl.constexpr,
    MEM_GRADS: tl.constexpr,
    MEM_PRECISION: tl.constexpr,
):  # fmt: skip
    # Program (h, split, e) walks a contiguous share of the B * n_row_blocks (batch, row block) items of head h.
    # e == 0 writes Delta of every row of the share and (MEM_GRADS) the share's partial dz and dgate; with
    # MEM_GRADS every e also sums the share's partial of dM's columns [e * BLOCK_E, (e + 1) * BLOCK_E): a whole
    # (D, D) fp32 accumulator spills at D = 128 on FMA units. Rows past L load as zeros, and their dO = 0 makes
    # every contribution 0.
    off_h = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    pid_e = tl.program_id(2)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    mem_base = MEM + off_h * HEAD_DIM * HEAD_DIM
    norm_base = NORM + off_h * HEAD_DIM
    gate = tl.load(GATE + off_h)
    dmem = tl.zeros([BLOCK_D, BLOCK_E], dtype=tl.float32)
    dnorm = tl.zeros([BLOCK_D], dtype=tl.float32)
    dgate = tl.zeros([BLOCK_R], dtype=tl.float32)

    first = split * items_per_split
    last = tl.minimum(first + items_per_split, total_items)
    for item in range(first, last):
        off_b = (item // n_row_blocks).to(tl.int64)
        offs_m = (item % n_row_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_dob + off_h * stride_doh
        q = _load_rows(q_base, offs_m, offs_d, stride_qm, L, HEAD_DIM, BLOCK_D, True)
        f = _phi(q.to(tl.float32) * scale, FEATURE)
        inv_den = _inv_den(q_base, offs_m, stride_qm, L, scale, norm_base, eps, HEAD_DIM, BLOCK_C, FEATURE)
        if pid_e == 0:
            o = _load_rows(Out + off_b * stride_ob + off_h * stride_oh, offs_m, offs_d, stride_om, L, HEAD_DIM,
                           BLOCK_D, True)  # fmt: skip
            do = _load_rows(do_base, offs_m, offs_d, stride_dom, L, HEAD_DIM, BLOCK_D, True).to(tl.float32)
            w = _memory_dot(
                tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32), do_base, offs_m, stride_dom, L,
                tl.full([BLOCK_R], 1.0, tl.float32), 1.0, mem_base,
                HEAD_DIM, BLOCK_D, BLOCK_C, -1, True, MEM_PRECISION,
            )  # fmt: skip
            c = tl.sum(f * w, 1) * inv_den  # dO_i . m_i
            # O holds gate * m_i on top of the softmax output; the softmax Jacobian wants the latter only.
            delta = tl.sum(o.to(tl.float32) * do, 1) - gate * c
            tl.store(DELTA + (off_b * H + off_h) * L + offs_m, delta, mask=offs_m < L)
            if MEM_GRADS:
                dgate += c
                if FEATURE != 2:
                    dnorm += tl.sum(f * (-gate * c * inv_den)[:, None], 0)
        if MEM_GRADS:
            do_ptrs = do_base + offs_m[:, None] * stride_dom + offs_e[None, :]
            do_e = tl.load(do_ptrs, mask=(offs_m[:, None] < L) & (offs_e[None, :] < HEAD_DIM), other=0.0)
            do_e = do_e.to(tl.float32) * (gate * inv_den)[:, None]
            dmem = tl.dot(tl.trans(f), do_e, dmem, input_precision=MEM_PRECISION)

    if MEM_GRADS:
        part = split.to(tl.int64) * H + off_h
        dmem_ptrs = DMEM_PART + part * HEAD_DIM * HEAD_DIM + offs_d[:, None] * HEAD_DIM + offs_e[None, :]
        tl.store(dmem_ptrs, dmem, mask=(offs_d[:, None] < HEAD_DIM) & (offs_e[None, :] < HEAD_DIM))
        if pid_e == 0:
            if FEATURE != 2:
                tl.store(DNORM_PART + part * HEAD_DIM + offs_d, dnorm, mask=offs_d < HEAD_DIM)
            tl.store(DGATE_PART + part, tl.sum(dgate, 0))


@triton.jit
def _plus_bwd_dq(
    Q, K, V, DO, LSE, DELTA, PAD, MEM, NORM, GATE, DQ,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_padb,
    H, L,
    qk_scale, scale, eps,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M2: tl.constexpr,
    BLOCK_N2: tl.constexpr,
    BLOCK_C: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr,
    FEATURE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    MEM_PRECISION: tl.constexpr,
):  # fmt: skip
    start_m = tl.program_id(0) * BLOCK_M2
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    pad_base = PAD + off_b * stride_padb

    offs_m = start_m + tl.arange(0, BLOCK_M2)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_base, offs_m, offs_d, stride_qm, L, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(do_base, offs_m, offs_d, stride_dom, L, HEAD_DIM, BLOCK_D, True)
    lse = tl.load(LSE + off_bh.to(tl.int64) * L + offs_m, mask=offs_m < L, other=float("inf"))
    delta = tl.load(DELTA + off_bh.to(tl.int64) * L + offs_m, mask=offs_m < L, other=0.0)
    dq = tl.zeros([BLOCK_M2, BLOCK_D], dtype=tl.float32)
    no_d2 = BLOCK_D + tl.arange(0, 16)  # one padded head-dim tile: dummies for the second part (SPLIT=False)
    dq, dq_unused = _attn_bwd_dq_sequence(
        dq, tl.zeros([BLOCK_M2, 16], dtype=tl.float32), q, tl.zeros([BLOCK_M2, 16], dtype=q.dtype),
        do, tl.zeros([BLOCK_M2, 16], dtype=do.dtype), lse, delta,
        k_base, v_base, stride_kn, stride_vn, pad_base, offs_m, offs_d, no_d2, start_m, L, qk_scale,
        HEAD_DIM, BLOCK_D, 16, False, BLOCK_M2, BLOCK_N2, CAUSAL, HAS_PAD, DOT_PRECISION,
    )  # fmt: skip
    dq = dq * scale

    # Epilogue: the memory term's part, dq += s gate / den phi'(s q) (w - c z) with w = M dO, c = dO . m.
    w = _memory_dot(
        tl.zeros([BLOCK_M2, BLOCK_D], dtype=tl.float32), do_base, offs_m, stride_dom, L,
        tl.full([BLOCK_M2], 1.0, tl.float32), 1.0, MEM + off_h * HEAD_DIM * HEAD_DIM,
        HEAD_DIM, BLOCK_D, BLOCK_C, -1, True, MEM_PRECISION,
    )  # fmt: skip
    gate = tl.load(GATE + off_h)
    if FEATURE == 2:
        dq += (scale * gate) * w
    else:
        norm_base = NORM + off_h * HEAD_DIM
        inv_den = _inv_den(q_base, offs_m, stride_qm, L, scale, norm_base, eps, HEAD_DIM, BLOCK_C, FEATURE)
        x = q.to(tl.float32) * scale
        c = tl.sum(_phi(x, FEATURE) * w, 1) * inv_den
        z = tl.load(norm_base + offs_d, mask=offs_d < HEAD_DIM, other=0.0)
        dq += (scale * gate * inv_den)[:, None] * _phi_grad(x, FEATURE) * (w - c[:, None] * z[None, :])
    _store_rows(DQ + off_b * stride_dqb + off_h * stride_dqh, dq.to(DQ.dtype.element_ty), offs_m, offs_d,
                stride_dqm, L, HEAD_DIM, BLOCK_D)  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# launch configuration
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlusConfig:
    """Launch parameters: the sequence tiles of the classic kernels plus those of the memory products."""

    seq: KernelConfig  # block_m/n (forward), block_m1/n1 (dK/dV), block_m2/n2 (dQ); prefix fields unused
    block_r: int  # memory-gradient pass: query rows per step
    block_c: int  # head-dim columns contracted per step in every product with M
    block_e: int  # memory-gradient pass: dM columns per program
    splits: int  # memory-gradient pass: programs per head; their fp32 partials are summed by torch
    mem_warps: int = 4

    def __post_init__(self) -> None:
        for name in ("block_r", "block_c", "block_e"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"PlusConfig.{name}={value}: must be a power of two >= 16")
        if self.splits < 1:
            raise ValueError("PlusConfig.splits must be >= 1")


def default_plus_config(
    batch: int, heads: int, seq_len: int, head_dim: int, dtype: torch.dtype, device: torch.device
) -> PlusConfig:
    """Heuristic launch parameters: the sequence tiles of `_heuristic_config` (P = 0), adjusted for the epilogues.

    Checked only by compiling for sm_90a offline with ptxas -v (tests/kernels/test_plus_kernel.py): with
    these choices the three Prefix-Tuning+ kernels fit in shared memory and spill no registers for D in
    {64, 80, 128} in fp16 / bf16 / fp32 at the benchmark shapes. Not timed on hardware yet.
    """
    # The heuristic, not the sm_90 table: the table is measured for the classic kernel, whose head dim 80 runs
    # 64 + 16 wide; this kernel's runs as one 128-wide tile.
    seq = _heuristic_config(batch, heads, seq_len, 0, head_dim, dtype, device)
    if device.type != "cuda":
        # Interpreter: the smallest tiles, dM split in column blocks, a few splits, so that tiny test shapes
        # cross several blocks of everything.
        n_items = batch * triton.cdiv(seq_len, 16)
        return PlusConfig(seq, block_r=16, block_c=16, block_e=32, splits=max(1, min(3, n_items)))
    wide = _pow2_at_least_16(head_dim) >= 128  # D = 80 runs as 128
    # The epilogues' fp32 products with M (FMA dots, operands in registers; in dQ a second (rows, D) fp32
    # tile) sit next to the (rows, D) accumulator: smaller tiles, and 8 warps for 64-row blocks in fp16 / bf16,
    # keep ptxas from spilling, with the key-padding mask too (values found by compiling, see the docstring).
    if dtype == torch.float32:
        seq = replace(seq, block_n=min(seq.block_n, 16))
    else:
        block_m = min(seq.block_m, 64) if wide else seq.block_m
        block_n = min(seq.block_n, 32) if wide else seq.block_n if block_m >= 64 else 16
        block_m2 = min(seq.block_m2, 32 if wide else 64)
        seq = replace(
            seq, block_m=block_m, block_n=block_n, block_m2=block_m2, block_n2=min(seq.block_n2, block_m2),
            fwd_warps=8 if block_m >= 64 else 4,
        )  # fmt: skip
    # Memory-gradient pass: ~4 programs per SM over the heads and splits, independent of the batch size
    # (fewer partials to sum); dM in 32-column blocks per program (see _plus_bwd_memory); 16-row steps where
    # fp32 tiles of D = 128 would spill.
    block_r = 16 if dtype == torch.float32 and wide else 32
    n_items = batch * triton.cdiv(seq_len, block_r)
    splits = max(1, min(n_items, triton.cdiv(4 * _multiprocessor_count(device), heads)))
    return PlusConfig(seq, block_r=block_r, block_c=16, block_e=32, splits=splits, mem_warps=8)


# ---------------------------------------------------------------------------------------------------
# raw ops
# ---------------------------------------------------------------------------------------------------

# Every buffer a kernel writes is allocated through these two, so tests can pre-fill them with NaN.
_empty = torch.empty
_empty_like = torch.empty_like

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"prefix_plus_attention: {message}")


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    memory: torch.Tensor,
    norm: torch.Tensor | None,
    gate: torch.Tensor,
    feature_map: str,
    key_padding_mask: torch.Tensor | None,
) -> None:
    _require(feature_map in FEATURE_MAPS, f"feature_map {feature_map!r}; use one of {', '.join(FEATURE_MAPS)}")
    _require(q.dim() == 4, f"q must be (B, H, L, D), got shape {tuple(q.shape)}")
    _require(
        k.shape == q.shape and v.shape == q.shape,
        f"k and v must have q's shape {tuple(q.shape)}, got {tuple(k.shape)} and {tuple(v.shape)}",
    )
    batch, heads, seq_len, head_dim = q.shape
    _require(batch > 0 and heads > 0 and seq_len > 0, f"empty input shape {tuple(q.shape)}")
    _require(1 <= head_dim <= 128, f"head dim {head_dim} not supported (1..128)")
    _require(q.dtype in _DTYPES, f"dtype {q.dtype} not supported; use one of {_DTYPES}")
    _require(
        memory.shape == (heads, head_dim, head_dim),
        f"memory must be (H, D, D) = ({heads}, {head_dim}, {head_dim}), got {tuple(memory.shape)}",
    )
    if feature_map == "identity":
        _require(norm is None, "the identity feature map has no normaliser: pass norm=None")
    else:
        _require(norm is not None and norm.shape == (heads, head_dim),
                 f"norm must be (H, D) = ({heads}, {head_dim}) for {feature_map}, got "
                 f"{None if norm is None else tuple(norm.shape)}")  # fmt: skip
    _require(gate.shape == (heads,), f"gate must be (H,) = ({heads},), got {tuple(gate.shape)}")
    tensors = {"q": q, "k": k, "v": v, "memory": memory, "gate": gate} | ({} if norm is None else {"norm": norm})
    for name, t in tensors.items():
        _require(t.device == q.device, f"{name} is on {t.device}, q on {q.device}")
        if name in ("k", "v"):
            _require(t.dtype == q.dtype, f"{name} has dtype {t.dtype}, q has {q.dtype}")
        if name in ("q", "k", "v"):
            _require(t.stride(-1) == 1, f"{name} needs a contiguous last dim, got strides {t.stride()}")
        else:
            # The memory is read in fp32 whatever the activations' dtype ("at least fp32").
            _require(t.dtype == torch.float32, f"{name} must be float32, got {t.dtype}")
    _require(
        triton_available(q.device),
        f"Triton cannot run on {q.device} (CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before "
        "importing ptscale_kernels)",
    )
    if key_padding_mask is not None:
        _require(
            key_padding_mask.dtype == torch.bool and key_padding_mask.shape == (batch, seq_len),
            f"key_padding_mask must be bool (B, L) = ({batch}, {seq_len}), got {key_padding_mask.dtype} "
            f"{tuple(key_padding_mask.shape)}",
        )
        _require(key_padding_mask.device == q.device, f"key_padding_mask is on {key_padding_mask.device}")


def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    memory: torch.Tensor,
    norm: torch.Tensor | None,
    gate: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    feature: int,
    cfg: PlusConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns o (B, H, L, D) in q's dtype and the base-2 LSE (B, H, L) of the sequence softmax, fp32."""
    batch, heads, seq_len, head_dim = q.shape
    o = _empty_like(q)
    lse = _empty((batch, heads, seq_len), device=q.device, dtype=torch.float32)
    pad, s_padb = _pad_args(key_padding_mask, q)
    _plus_fwd[(triton.cdiv(seq_len, cfg.seq.block_m), batch * heads)](
        q, k, v, pad, memory, memory if norm is None else norm, gate, o, lse,
        *_strides3(q), *_strides3(k), *_strides3(v),
        s_padb,
        *_strides3(o),
        heads, seq_len,
        scale * LOG2E, scale, EPS,
        HEAD_DIM=head_dim, BLOCK_D=_pow2_at_least_16(head_dim),
        BLOCK_M=cfg.seq.block_m, BLOCK_N=cfg.seq.block_n, BLOCK_C=cfg.block_c,
        CAUSAL=causal, HAS_PAD=key_padding_mask is not None, FEATURE=feature,
        DOT_PRECISION=_dot_precision(q.dtype), MEM_PRECISION=_dot_precision(torch.float32),
        num_warps=cfg.seq.fwd_warps, num_stages=cfg.seq.num_stages,
    )  # fmt: skip
    return o, lse


def _backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    memory: torch.Tensor,
    norm: torch.Tensor | None,
    gate: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    o: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    scale: float,
    feature: int,
    cfg: PlusConfig,
    need_dq: bool = True,
    need_dkdv: bool = True,
    need_dmemory: bool = True,
) -> tuple[torch.Tensor | None, ...]:
    """Returns (dq, dk, dv, dmemory, dnorm, dgate); a gradient not asked for is None and not computed."""
    batch, heads, seq_len, head_dim = q.shape
    if do.stride(-1) != 1:
        do = do.contiguous()
    block_d = _pow2_at_least_16(head_dim)
    precision, mem_precision = _dot_precision(q.dtype), _dot_precision(torch.float32)
    has_pad = key_padding_mask is not None
    pad, s_padb = _pad_args(key_padding_mask, q)
    norm_arg = memory if norm is None else norm

    n_row_blocks = triton.cdiv(seq_len, cfg.block_r)
    total_items = batch * n_row_blocks
    items_per_split = triton.cdiv(total_items, min(cfg.splits, total_items))
    splits = triton.cdiv(total_items, items_per_split)  # no split left with nothing to do
    delta = _empty_like(lse)
    part_shape = (splits, heads) if need_dmemory else (1, 1)  # a stand-in pointer when nothing is reduced
    dmem_part = _empty((*part_shape, head_dim, head_dim), device=q.device, dtype=torch.float32)
    dnorm_part = _empty((*part_shape, head_dim), device=q.device, dtype=torch.float32)
    dgate_part = _empty(part_shape, device=q.device, dtype=torch.float32)
    n_col_blocks = triton.cdiv(head_dim, cfg.block_e) if need_dmemory else 1
    _plus_bwd_memory[(heads, splits, n_col_blocks)](
        q, o, do, memory, norm_arg, gate, delta, dmem_part, dnorm_part, dgate_part,
        *_strides3(q), *_strides3(o), *_strides3(do),
        heads, seq_len,
        n_row_blocks, total_items, items_per_split,
        scale, EPS,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_R=cfg.block_r, BLOCK_C=cfg.block_c, BLOCK_E=cfg.block_e,
        FEATURE=feature,
        MEM_GRADS=need_dmemory, MEM_PRECISION=mem_precision,
        num_warps=cfg.mem_warps,
    )  # fmt: skip

    dq = dk = dv = dmem = dnorm = dgate = None
    if need_dkdv:
        dk = _empty_like(k)
        dv = _empty_like(v)
        _attn_bwd_dkdv[(triton.cdiv(seq_len, cfg.seq.block_n1), batch * heads)](
            q, k, v, do, lse, delta, pad, dk, dv,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dk), *_strides3(dv),
            s_padb,
            heads, seq_len,
            scale * LOG2E, scale,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_D2=16, SPLIT=False,
            BLOCK_M1=cfg.seq.block_m1, BLOCK_N1=cfg.seq.block_n1,
            CAUSAL=causal, HAS_PAD=has_pad, DOT_PRECISION=precision,
            num_warps=cfg.seq.bwd_warps, num_stages=cfg.seq.num_stages,
        )  # fmt: skip
    if need_dq:
        dq = _empty_like(q)
        _plus_bwd_dq[(triton.cdiv(seq_len, cfg.seq.block_m2), batch * heads)](
            q, k, v, do, lse, delta, pad, memory, norm_arg, gate, dq,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dq),
            s_padb,
            heads, seq_len,
            scale * LOG2E, scale, EPS,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M2=cfg.seq.block_m2, BLOCK_N2=cfg.seq.block_n2,
            BLOCK_C=cfg.block_c, CAUSAL=causal, HAS_PAD=has_pad, FEATURE=feature,
            DOT_PRECISION=precision, MEM_PRECISION=mem_precision,
            num_warps=cfg.seq.bwd_warps, num_stages=cfg.seq.num_stages,
        )  # fmt: skip
    if need_dmemory:
        # fp32 partials per split, reduced by torch: deterministic, no atomics.
        dmem = dmem_part.sum(0)
        dnorm = None if norm is None else dnorm_part.sum(0)
        dgate = dgate_part.sum(0)
    return dq, dk, dv, dmem, dnorm, dgate


# ---------------------------------------------------------------------------------------------------
# autograd.Function and public functions
# ---------------------------------------------------------------------------------------------------


class _PrefixPlusAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        memory: torch.Tensor,
        norm: torch.Tensor | None,
        gate: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        causal: bool,
        scale: float,
        feature: int,
        cfg: PlusConfig,
    ) -> torch.Tensor:
        with torch.cuda.device_of(q):  # Triton launches on the current device; make it q's
            o, lse = _forward(q, k, v, memory, norm, gate, key_padding_mask, causal, scale, feature, cfg)
        ctx.save_for_backward(q, k, v, memory, norm, gate, o, lse, key_padding_mask)
        ctx.causal = causal
        ctx.scale = scale
        ctx.feature = feature
        ctx.cfg = cfg
        return o

    @staticmethod
    def backward(ctx, do: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, memory, norm, gate, o, lse, key_padding_mask = ctx.saved_tensors
        need = ctx.needs_input_grad
        with torch.cuda.device_of(q):
            dq, dk, dv, dmem, dnorm, dgate = _backward(
                do, q, k, v, memory, norm, gate, key_padding_mask, o, lse, ctx.causal, ctx.scale, ctx.feature,
                ctx.cfg, need_dq=need[0], need_dkdv=need[1] or need[2], need_dmemory=any(need[3:6]),
            )  # fmt: skip
        return (
            dq,
            dk if need[1] else None,
            dv if need[2] else None,
            dmem if need[3] else None,
            dnorm if need[4] else None,
            dgate if need[5] else None,
            None,
            None,
            None,
            None,
            None,
        )


def plus_memory(
    prefix_k: torch.Tensor, prefix_v: torch.Tensor, feature_map: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The per-head memory of a Prefix-Tuning+ prefix, in plain torch (differentiable).

    prefix_k, prefix_v: (H, P, D) with P >= 1. Returns memory (H, D, D) and norm (H, D), or None for
    "identity", computed in fp32 (fp64 for fp64 inputs): elu1 / relu: memory = phi(K)^T V,
    norm = sum_j phi(k_j); identity: memory = K^T V / P.
    """
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"plus_memory: feature_map {feature_map!r}; use one of {', '.join(FEATURE_MAPS)}")
    if prefix_k.dim() != 3 or prefix_v.shape != prefix_k.shape or prefix_k.shape[1] == 0:
        raise ValueError(f"plus_memory: prefix_k and prefix_v must be (H, P, D) with P >= 1, got "
                         f"{tuple(prefix_k.shape)} and {tuple(prefix_v.shape)}")  # fmt: skip
    work = torch.promote_types(prefix_k.dtype, torch.float32)
    keys, values = prefix_k.to(work), prefix_v.to(work)
    if feature_map == "identity":
        return keys.transpose(-1, -2) @ values / keys.shape[-2], None
    features = F.elu(keys) + 1.0 if feature_map == "elu1" else F.relu(keys)
    return features.transpose(-1, -2) @ values, features.sum(dim=-2)


def _prefix_plus_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    memory: torch.Tensor,
    norm: torch.Tensor | None,
    gate: torch.Tensor,
    *,
    feature_map: str,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    config: PlusConfig | None = None,
) -> torch.Tensor:
    """`prefix_plus_attention` with an explicit launch configuration (tests and tuning)."""
    _check_inputs(q, k, v, memory, norm, gate, feature_map, key_padding_mask)
    batch, heads, seq_len, head_dim = q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if config is None:
        config = default_plus_config(batch, heads, seq_len, head_dim, q.dtype, q.device)
    memory = memory.contiguous()
    norm = None if norm is None else norm.contiguous()
    feature = FEATURE_MAPS.index(feature_map)
    return _PrefixPlusAttention.apply(
        q, k, v, memory, norm, gate.contiguous(), key_padding_mask, bool(causal), float(scale), feature, config
    )


def prefix_plus_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    memory: torch.Tensor,
    norm: torch.Tensor | None,
    gate: torch.Tensor,
    *,
    feature_map: str,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Prefix-Tuning+ attention: softmax attention over the masked sequence plus the gated memory term.

    Args:
        q, k, v: (B, H, L, D), fp16 / bf16 / fp32, last dim contiguous (any other strides).
        memory: (H, D, D) fp32 and norm: (H, D) fp32 (None for "identity"), as `plus_memory` returns
            them from the (H, P, D) prefix keys / values; differentiable, so the prefix gradients follow
            by autograd. One memory per query head (for grouped-query prefixes, repeat it per head).
        gate: (H,) fp32, the per-head gate.
        feature_map: "elu1", "relu" or "identity" (must match how `memory` was built).
        key_padding_mask: optional (B, L) bool, True = real token; padded keys are never attended.
            Queries are not masked, and the memory term sees no mask at all.
        causal: query i sees sequence keys 0..i (the memory is always seen).
        scale: softmax scale s, default 1 / sqrt(D); the memory term reads phi(s q) too.

    Returns:
        (B, H, L, D) in q's dtype: SoftmaxAttn(q, k, v) + gate * phi(s q) memory / (phi(s q) norm + 1e-6)
        (identity: + gate * (s q) memory). A row that sees no sequence key gets the memory term alone.

    Backward gives dq, dk, dv, dmemory, dnorm and dgate; dmemory, dnorm and dgate are reduced from fp32
    per-split partials by torch, so all gradients are deterministic run to run. Gradients not required
    are not computed. The memory term is computed in fp32 (tf32 products when
    `torch.get_float32_matmul_precision()` is not "highest"). Runs on CUDA tensors, or on CPU under the
    Triton interpreter (TRITON_INTERPRET=1 set before import; slow, for tests). Raises ValueError before
    launching anything on any shape / dtype / device / layout violation.
    """
    return _prefix_plus_attention(
        q, k, v, memory, norm, gate,
        feature_map=feature_map, key_padding_mask=key_padding_mask, causal=causal, scale=scale,
    )  # fmt: skip
