"""Fused prefix attention in Triton: a batch-shared prefix K/V read in place, never expanded.

Layout follows the Triton fused-attention tutorial (06-fused-attention.py): jit helpers, the forward
kernel, the backward pieces (preprocess, dK/dV pass, dprefix pass, dQ pass), the autograd.Function,
then the public function `prefix_attention` whose docstring is the contract.

Algorithm
---------
Forward: one program owns a block of query rows of one (batch, head). It streams the prefix tiles
from the (H, P, D) prefix pointer (no batch stride; never causal-masked; never padded), then the
sequence tiles with the causal / key-padding masks, keeping an online softmax in base 2. It writes
O and the base-2 log-sum-exp (LSE) of every row, which the backward uses to recompute P = exp2(S - LSE).

Backward (Delta = rowsum(O * dO) first, as in FlashAttention-2):
  * dK/dV of the sequence: one program per key block of one (batch, head), looping over query blocks.
  * dK/dV of the prefix: the same loop body, but one program per (prefix tile, head, split) looping
    over a fixed share of the B * ceil(L / BLOCK_M1) query blocks of that head; each split writes
    an fp32 partial and torch sums the splits. No atomics, so the result is bitwise deterministic,
    and the partial buffer is (splits, H, P, D) with splits ~ 4 * SMs / (H * prefix tiles), i.e.
    independent of the batch size.
  * dQ: one program per query block, looping over the prefix tiles, then the sequence tiles.

Prefix-Tuning+
--------------
`triton_prefix_plus.py` builds the Prefix-Tuning+ variant (prefix moved out of the softmax into a
per-head linear-attention memory) from the sequence parts of these kernels: `_attn_fwd_sequence`,
`_finish_rows`, `_attn_bwd_dkdv` and `_attn_bwd_dq_sequence` are shared with it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # log2(e): the kernels use exp2, so scores are pre-multiplied by it


# ---------------------------------------------------------------------------------------------------
# jit helpers
# ---------------------------------------------------------------------------------------------------
#
# Head dim in two parts. A tile's width must be a power of two, so a head dim such as 80 (OPT-2.7B) or 96
# is split into a power-of-two part [0, BLOCK_D) and a second part [BLOCK_D, BLOCK_D + BLOCK_D2) (80 = 64 + 16,
# 96 = 64 + 32), each with its own tiles and dots: Q K^T is the sum of the two parts' dots, and P V, dK, dV, dQ
# are computed per part. That is the matrix work of D itself, where padding 80 to one 128-wide tile would do
# 1.6x. SPLIT is a compile-time flag: without it (D a power of two, or a split that would save nothing) the
# second part's arguments are dummies that no code reads, and the compiler drops them.


@triton.jit
def _load_rows(
    base,
    offs_r,
    offs_d,
    stride_r,
    n_rows,
    HEAD_DIM: tl.constexpr,
    D_END: tl.constexpr,
    CHECK_ROWS: tl.constexpr,
):
    # (rows, len(offs_d)) tile of a row-major (rows, HEAD_DIM) matrix. D_END is where this tile's head-dim
    # columns end; past HEAD_DIM (a part padded to a power of two) the extra columns load as zeros, which
    # leaves every dot product unchanged.
    ptrs = base + offs_r[:, None] * stride_r + offs_d[None, :]
    if CHECK_ROWS:
        if D_END <= HEAD_DIM:
            tile = tl.load(ptrs, mask=offs_r[:, None] < n_rows, other=0.0)
        else:
            tile = tl.load(ptrs, mask=(offs_r[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if D_END <= HEAD_DIM:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return tile


@triton.jit
def _store_rows(
    base,
    tile,
    offs_r,
    offs_d,
    stride_r,
    n_rows,
    HEAD_DIM: tl.constexpr,
    D_END: tl.constexpr,
):
    ptrs = base + offs_r[:, None] * stride_r + offs_d[None, :]
    if D_END <= HEAD_DIM:
        tl.store(ptrs, tile, mask=offs_r[:, None] < n_rows)
    else:
        tl.store(ptrs, tile, mask=(offs_r[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _score_mask(
    offs_m,
    offs_n,
    n_keys,
    pad_base,
    CAUSAL: tl.constexpr,
    CHECK_KEYS: tl.constexpr,
    HAS_PAD: tl.constexpr,
):
    # (BLOCK_M, BLOCK_N) True where query row m may attend key n of the current tile.
    valid = (offs_m[:, None] >= 0) & (offs_n[None, :] >= 0)
    if CHECK_KEYS:
        valid = valid & (offs_n[None, :] < n_keys)
    if CAUSAL:
        valid = valid & (offs_m[:, None] >= offs_n[None, :])
    if HAS_PAD:
        real = tl.load(pad_base + offs_n, mask=offs_n < n_keys, other=0)
        valid = valid & (real[None, :] != 0)
    return valid


@triton.jit
def _attn_fwd_inner(
    acc,
    acc2,
    l_i,
    m_i,
    q,
    q2,
    k_base,
    v_base,
    stride_kn,
    stride_vn,
    pad_base,
    offs_m,
    offs_d,
    offs_d2,
    lo,
    hi,
    n_keys,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_D2: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    CHECK_KEYS: tl.constexpr,
    HAS_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Online softmax over key tiles [lo, hi). Masked and unmasked ranges share this body through the
    # compile-time flags, so the interior tiles pay for no mask at all.
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, offs_n, offs_d, stride_kn, n_keys, HEAD_DIM, BLOCK_D, CHECK_KEYS)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if SPLIT:
            k2 = _load_rows(k_base, offs_n, offs_d2, stride_kn, n_keys, HEAD_DIM, BLOCK_D + BLOCK_D2, CHECK_KEYS)
            qk = tl.dot(q2, tl.trans(k2), qk, input_precision=DOT_PRECISION)
        qk = qk * qk_scale
        if CAUSAL or CHECK_KEYS or HAS_PAD:
            qk = tl.where(_score_mask(offs_m, offs_n, n_keys, pad_base, CAUSAL, CHECK_KEYS, HAS_PAD), qk, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row with no visible key so far keeps m = -inf; shifting by 0 instead avoids inf - inf.
        m_shift = tl.where(m_new == -float("inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = _load_rows(v_base, offs_n, offs_d, stride_vn, n_keys, HEAD_DIM, BLOCK_D, CHECK_KEYS)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        if SPLIT:
            acc2 = acc2 * alpha[:, None]
            v2 = _load_rows(v_base, offs_n, offs_d2, stride_vn, n_keys, HEAD_DIM, BLOCK_D + BLOCK_D2, CHECK_KEYS)
            acc2 = tl.dot(p.to(v2.dtype), v2, acc2, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, acc2, l_i, m_i


@triton.jit
def _attn_fwd_sequence(
    acc,
    acc2,
    l_i,
    m_i,
    q,
    q2,
    k_base,
    v_base,
    stride_kn,
    stride_vn,
    pad_base,
    offs_m,
    offs_d,
    offs_d2,
    start_m,
    L,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_D2: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # The sequence tiles of query block start_m (after its prefix tiles, if any).
    if CAUSAL:
        # Keys left of this query block are visible to all of its rows; only the diagonal block
        # needs the causal mask (BLOCK_M is a multiple of BLOCK_N, so the ranges stay aligned).
        diag = start_m * BLOCK_M
        acc, acc2, l_i, m_i = _attn_fwd_inner(
            acc, acc2, l_i, m_i, q, q2, k_base, v_base, stride_kn, stride_vn, pad_base, offs_m, offs_d, offs_d2,
            0, diag, L, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT, BLOCK_N, False, False, HAS_PAD, DOT_PRECISION,
        )  # fmt: skip
        acc, acc2, l_i, m_i = _attn_fwd_inner(
            acc, acc2, l_i, m_i, q, q2, k_base, v_base, stride_kn, stride_vn, pad_base, offs_m, offs_d, offs_d2,
            diag, tl.minimum(diag + BLOCK_M, L), L, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT, BLOCK_N, True, True, HAS_PAD, DOT_PRECISION,
        )  # fmt: skip
    else:
        l_full = (L // BLOCK_N) * BLOCK_N
        acc, acc2, l_i, m_i = _attn_fwd_inner(
            acc, acc2, l_i, m_i, q, q2, k_base, v_base, stride_kn, stride_vn, pad_base, offs_m, offs_d, offs_d2,
            0, l_full, L, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT, BLOCK_N, False, False, HAS_PAD, DOT_PRECISION,
        )  # fmt: skip
        acc, acc2, l_i, m_i = _attn_fwd_inner(
            acc, acc2, l_i, m_i, q, q2, k_base, v_base, stride_kn, stride_vn, pad_base, offs_m, offs_d, offs_d2,
            l_full, L, L, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT, BLOCK_N, False, True, HAS_PAD, DOT_PRECISION,
        )  # fmt: skip
    return acc, acc2, l_i, m_i


@triton.jit
def _finish_rows(acc, l_i, m_i):
    # A row that saw no key at all (only possible with P = 0) outputs zeros, like torch SDPA, and
    # stores LSE = +inf so that the backward's exp2(S - LSE) is exactly 0 for it.
    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    return acc, lse


@triton.jit
def _normalise_rows(acc, l_i):
    # The second head-dim part's share of _finish_rows.
    return acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]


# ---------------------------------------------------------------------------------------------------
# forward kernel
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd(
    Q, K, V, PK, PV, PAD, Out, LSE,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_pkh, stride_pkn,
    stride_pvh, stride_pvn,
    stride_padb,
    stride_ob, stride_oh, stride_om,
    H, L, P,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_D2: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    # int64: batch * head offsets exceed 2**31 elements for long sequences.
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    pad_base = PAD + off_b * stride_padb
    # The prefix is shared by the batch: its base pointer has no batch term.
    pk_base = PK + off_h * stride_pkh
    pv_base = PV + off_h * stride_pvh

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
    q = _load_rows(q_base, offs_m, offs_d, stride_qm, L, HEAD_DIM, BLOCK_D, True)
    acc2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)
    if SPLIT:
        q2 = _load_rows(q_base, offs_m, offs_d2, stride_qm, L, HEAD_DIM, BLOCK_D + BLOCK_D2, True)
    else:
        q2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=q.dtype)  # never read
    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Prefix tiles: full tiles unmasked, then the ragged last tile (P % BLOCK_P) with a bound check.
    p_full = (P // BLOCK_P) * BLOCK_P
    acc, acc2, l_i, m_i = _attn_fwd_inner(
        acc, acc2, l_i, m_i, q, q2, pk_base, pv_base, stride_pkn, stride_pvn, pad_base, offs_m, offs_d, offs_d2,
        0, p_full, P, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT, BLOCK_P, False, False, False, DOT_PRECISION,
    )  # fmt: skip
    acc, acc2, l_i, m_i = _attn_fwd_inner(
        acc, acc2, l_i, m_i, q, q2, pk_base, pv_base, stride_pkn, stride_pvn, pad_base, offs_m, offs_d, offs_d2,
        p_full, P, P, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT, BLOCK_P, False, True, False, DOT_PRECISION,
    )  # fmt: skip

    acc, acc2, l_i, m_i = _attn_fwd_sequence(
        acc, acc2, l_i, m_i, q, q2, k_base, v_base, stride_kn, stride_vn, pad_base, offs_m, offs_d, offs_d2,
        start_m, L, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT, BLOCK_M, BLOCK_N, CAUSAL, HAS_PAD, DOT_PRECISION,
    )  # fmt: skip
    o_base = Out + off_b * stride_ob + off_h * stride_oh
    if SPLIT:
        acc2 = _normalise_rows(acc2, l_i)
        _store_rows(o_base, acc2.to(Out.dtype.element_ty), offs_m, offs_d2, stride_om, L, HEAD_DIM, BLOCK_D + BLOCK_D2)
    acc, lse = _finish_rows(acc, l_i, m_i)
    tl.store(LSE + off_bh.to(tl.int64) * L + offs_m, lse, mask=offs_m < L)
    _store_rows(o_base, acc.to(Out.dtype.element_ty), offs_m, offs_d, stride_om, L, HEAD_DIM, BLOCK_D)


# ---------------------------------------------------------------------------------------------------
# backward kernels
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_preprocess(
    Out, DO, DELTA,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    H, L,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_D2: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    # Delta_i = rowsum(O_i * dO_i) = sum_j P_ij dP_ij, the softmax-Jacobian term of dS.
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o_base = Out + off_b * stride_ob + off_h * stride_oh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    o = _load_rows(o_base, offs_m, offs_d, stride_om, L, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(do_base, offs_m, offs_d, stride_dom, L, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    if SPLIT:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        o2 = _load_rows(o_base, offs_m, offs_d2, stride_om, L, HEAD_DIM, BLOCK_D + BLOCK_D2, True)
        do2 = _load_rows(do_base, offs_m, offs_d2, stride_dom, L, HEAD_DIM, BLOCK_D + BLOCK_D2, True)
        delta += tl.sum(o2.to(tl.float32) * do2.to(tl.float32), axis=1)
    tl.store(DELTA + off_bh.to(tl.int64) * L + offs_m, delta, mask=offs_m < L)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk,
    dv,
    dk2,
    dv2,
    k,
    v,
    k2,
    v2,
    key_real,
    q_base,
    do_base,
    lse_base,
    delta_base,
    stride_qm,
    stride_dom,
    offs_n,
    offs_d,
    offs_d2,
    lo,
    hi,
    L,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_D2: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M1: tl.constexpr,
    CAUSAL: tl.constexpr,
    CHECK_ROWS: tl.constexpr,
    HAS_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Keys fixed, query blocks [lo, hi) streamed; works on the transposed scores so that dK and dV
    # accumulate as (BLOCK_N, D) without transposing the accumulators.
    for start_m in range(lo, hi, BLOCK_M1):
        start_m = tl.multiple_of(start_m, BLOCK_M1)
        offs_m = start_m + tl.arange(0, BLOCK_M1)
        q = _load_rows(q_base, offs_m, offs_d, stride_qm, L, HEAD_DIM, BLOCK_D, CHECK_ROWS)
        do = _load_rows(do_base, offs_m, offs_d, stride_dom, L, HEAD_DIM, BLOCK_D, CHECK_ROWS)
        if CHECK_ROWS:
            # LSE = +inf makes exp2(S - LSE) = 0 for rows past the end.
            lse = tl.load(lse_base + offs_m, mask=offs_m < L, other=float("inf"))
            delta = tl.load(delta_base + offs_m, mask=offs_m < L, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        if SPLIT:
            q2 = _load_rows(q_base, offs_m, offs_d2, stride_qm, L, HEAD_DIM, BLOCK_D + BLOCK_D2, CHECK_ROWS)
            do2 = _load_rows(do_base, offs_m, offs_d2, stride_dom, L, HEAD_DIM, BLOCK_D + BLOCK_D2, CHECK_ROWS)
            qk_t = tl.dot(k2, tl.trans(q2), qk_t, input_precision=DOT_PRECISION)
        p_t = tl.math.exp2(qk_t * qk_scale - lse[None, :])
        if CAUSAL:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        if HAS_PAD:
            p_t = tl.where(key_real[:, None], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if SPLIT:
            dv2 = tl.dot(p_t.to(do2.dtype), do2, dv2, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v2, tl.trans(do2), dp_t, input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
        if SPLIT:
            dk2 = tl.dot(ds_t.to(q2.dtype), q2, dk2, input_precision=DOT_PRECISION)
    return dk, dv, dk2, dv2


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, PAD, DK, DV,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_padb,
    H, L,
    qk_scale, scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_D2: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M1: tl.constexpr,
    BLOCK_N1: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    start_n = tl.program_id(0) * BLOCK_N1
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    lse_base = LSE + off_bh.to(tl.int64) * L
    delta_base = DELTA + off_bh.to(tl.int64) * L
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh

    offs_n = start_n + tl.arange(0, BLOCK_N1)
    offs_d = tl.arange(0, BLOCK_D)
    offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
    k = _load_rows(k_base, offs_n, offs_d, stride_kn, L, HEAD_DIM, BLOCK_D, True)
    v = _load_rows(v_base, offs_n, offs_d, stride_vn, L, HEAD_DIM, BLOCK_D, True)
    if SPLIT:
        k2 = _load_rows(k_base, offs_n, offs_d2, stride_kn, L, HEAD_DIM, BLOCK_D + BLOCK_D2, True)
        v2 = _load_rows(v_base, offs_n, offs_d2, stride_vn, L, HEAD_DIM, BLOCK_D + BLOCK_D2, True)
    else:
        k2 = tl.zeros([BLOCK_N1, BLOCK_D2], dtype=k.dtype)  # never read
        v2 = tl.zeros([BLOCK_N1, BLOCK_D2], dtype=v.dtype)
    if HAS_PAD:
        # A padded key is attended by nobody: its P column is zero, so its dK and dV are zero.
        key_real = tl.load(PAD + off_b * stride_padb + offs_n, mask=offs_n < L, other=0) != 0
    else:
        key_real = offs_n >= 0
    dk = tl.zeros([BLOCK_N1, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N1, BLOCK_D], dtype=tl.float32)
    dk2 = tl.zeros([BLOCK_N1, BLOCK_D2], dtype=tl.float32)
    dv2 = tl.zeros([BLOCK_N1, BLOCK_D2], dtype=tl.float32)

    m_full = (L // BLOCK_M1) * BLOCK_M1
    if CAUSAL:
        # Queries before start_n never see these keys. The diagonal band [start_n, start_n + BLOCK_N1)
        # needs the causal mask; below it, full query blocks need no mask and the ragged tail a bound.
        after_diag = start_n + BLOCK_N1
        dk, dv, dk2, dv2 = _attn_bwd_dkdv_inner(
            dk, dv, dk2, dv2, k, v, k2, v2, key_real, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
            offs_n, offs_d, offs_d2, start_n, tl.minimum(after_diag, L), L, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT, BLOCK_M1, True, True, HAS_PAD, DOT_PRECISION,
        )  # fmt: skip
        dk, dv, dk2, dv2 = _attn_bwd_dkdv_inner(
            dk, dv, dk2, dv2, k, v, k2, v2, key_real, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
            offs_n, offs_d, offs_d2, after_diag, m_full, L, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT, BLOCK_M1, False, False, HAS_PAD, DOT_PRECISION,
        )  # fmt: skip
        dk, dv, dk2, dv2 = _attn_bwd_dkdv_inner(
            dk, dv, dk2, dv2, k, v, k2, v2, key_real, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
            offs_n, offs_d, offs_d2, tl.maximum(after_diag, m_full), L, L, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT, BLOCK_M1, False, True, HAS_PAD, DOT_PRECISION,
        )  # fmt: skip
    else:
        dk, dv, dk2, dv2 = _attn_bwd_dkdv_inner(
            dk, dv, dk2, dv2, k, v, k2, v2, key_real, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
            offs_n, offs_d, offs_d2, 0, m_full, L, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT, BLOCK_M1, False, False, HAS_PAD, DOT_PRECISION,
        )  # fmt: skip
        dk, dv, dk2, dv2 = _attn_bwd_dkdv_inner(
            dk, dv, dk2, dv2, k, v, k2, v2, key_real, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
            offs_n, offs_d, offs_d2, m_full, L, L, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT, BLOCK_M1, False, True, HAS_PAD, DOT_PRECISION,
        )  # fmt: skip

    dk_base = DK + off_b * stride_dkb + off_h * stride_dkh
    dv_base = DV + off_b * stride_dvb + off_h * stride_dvh
    _store_rows(dk_base, (dk * scale).to(DK.dtype.element_ty), offs_n, offs_d, stride_dkn, L, HEAD_DIM, BLOCK_D)
    _store_rows(dv_base, dv.to(DV.dtype.element_ty), offs_n, offs_d, stride_dvn, L, HEAD_DIM, BLOCK_D)
    if SPLIT:
        _store_rows(dk_base, (dk2 * scale).to(DK.dtype.element_ty), offs_n, offs_d2, stride_dkn, L, HEAD_DIM,
                    BLOCK_D + BLOCK_D2)  # fmt: skip
        _store_rows(dv_base, dv2.to(DV.dtype.element_ty), offs_n, offs_d2, stride_dvn, L, HEAD_DIM,
                    BLOCK_D + BLOCK_D2)  # fmt: skip


@triton.jit
def _attn_bwd_dprefix(
    Q, PK, PV, DO, LSE, DELTA, DPK_PART, DPV_PART,
    stride_qb, stride_qh, stride_qm,
    stride_pkh, stride_pkn,
    stride_pvh, stride_pvn,
    stride_dob, stride_doh, stride_dom,
    H, L, P,
    n_q_blocks, total_items, items_per_split,
    qk_scale, scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_D2: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M1: tl.constexpr,
    BLOCK_P: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    # dK_p / dV_p of one prefix tile of one head, summed over a contiguous share of the B * n_q_blocks
    # (batch, query block) items of that head. Every query row sees every prefix key, so no causal or
    # padding mask applies here; the partial is written in fp32 and the splits are summed by torch.
    pid_p = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    offs_n = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
    k = _load_rows(PK + off_h * stride_pkh, offs_n, offs_d, stride_pkn, P, HEAD_DIM, BLOCK_D, True)
    v = _load_rows(PV + off_h * stride_pvh, offs_n, offs_d, stride_pvn, P, HEAD_DIM, BLOCK_D, True)
    if SPLIT:
        k2 = _load_rows(PK + off_h * stride_pkh, offs_n, offs_d2, stride_pkn, P, HEAD_DIM, BLOCK_D + BLOCK_D2, True)
        v2 = _load_rows(PV + off_h * stride_pvh, offs_n, offs_d2, stride_pvn, P, HEAD_DIM, BLOCK_D + BLOCK_D2, True)
    else:
        k2 = tl.zeros([BLOCK_P, BLOCK_D2], dtype=k.dtype)  # never read
        v2 = tl.zeros([BLOCK_P, BLOCK_D2], dtype=v.dtype)
    no_pad = offs_n >= 0
    dk = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    dk2 = tl.zeros([BLOCK_P, BLOCK_D2], dtype=tl.float32)
    dv2 = tl.zeros([BLOCK_P, BLOCK_D2], dtype=tl.float32)

    first = split * items_per_split
    last = tl.minimum(first + items_per_split, total_items)
    for item in range(first, last):
        off_b = (item // n_q_blocks).to(tl.int64)
        start_m = (item % n_q_blocks) * BLOCK_M1
        off_bh = off_b * H + off_h
        dk, dv, dk2, dv2 = _attn_bwd_dkdv_inner(
            dk, dv, dk2, dv2, k, v, k2, v2, no_pad,
            Q + off_b * stride_qb + off_h * stride_qh, DO + off_b * stride_dob + off_h * stride_doh,
            LSE + off_bh * L, DELTA + off_bh * L, stride_qm, stride_dom,
            offs_n, offs_d, offs_d2, start_m, start_m + BLOCK_M1, L, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT, BLOCK_M1, False, True, False, DOT_PRECISION,
        )  # fmt: skip

    part = (split.to(tl.int64) * H + off_h) * P * HEAD_DIM
    _store_rows(DPK_PART + part, dk * scale, offs_n, offs_d, HEAD_DIM, P, HEAD_DIM, BLOCK_D)
    _store_rows(DPV_PART + part, dv, offs_n, offs_d, HEAD_DIM, P, HEAD_DIM, BLOCK_D)
    if SPLIT:
        _store_rows(DPK_PART + part, dk2 * scale, offs_n, offs_d2, HEAD_DIM, P, HEAD_DIM, BLOCK_D + BLOCK_D2)
        _store_rows(DPV_PART + part, dv2, offs_n, offs_d2, HEAD_DIM, P, HEAD_DIM, BLOCK_D + BLOCK_D2)


@triton.jit
def _attn_bwd_dq_inner(
    dq,
    dq2,
    q,
    q2,
    do,
    do2,
    lse,
    delta,
    k_base,
    v_base,
    stride_kn,
    stride_vn,
    pad_base,
    offs_m,
    offs_d,
    offs_d2,
    lo,
    hi,
    n_keys,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_D2: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_N2: tl.constexpr,
    CAUSAL: tl.constexpr,
    CHECK_KEYS: tl.constexpr,
    HAS_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N2):
        start_n = tl.multiple_of(start_n, BLOCK_N2)
        offs_n = start_n + tl.arange(0, BLOCK_N2)
        k = _load_rows(k_base, offs_n, offs_d, stride_kn, n_keys, HEAD_DIM, BLOCK_D, CHECK_KEYS)
        v = _load_rows(v_base, offs_n, offs_d, stride_vn, n_keys, HEAD_DIM, BLOCK_D, CHECK_KEYS)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if SPLIT:
            k2 = _load_rows(k_base, offs_n, offs_d2, stride_kn, n_keys, HEAD_DIM, BLOCK_D + BLOCK_D2, CHECK_KEYS)
            v2 = _load_rows(v_base, offs_n, offs_d2, stride_vn, n_keys, HEAD_DIM, BLOCK_D + BLOCK_D2, CHECK_KEYS)
            qk = tl.dot(q2, tl.trans(k2), qk, input_precision=DOT_PRECISION)
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if CAUSAL or CHECK_KEYS or HAS_PAD:
            p = tl.where(_score_mask(offs_m, offs_n, n_keys, pad_base, CAUSAL, CHECK_KEYS, HAS_PAD), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if SPLIT:
            dp = tl.dot(do2, tl.trans(v2), dp, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
        if SPLIT:
            dq2 = tl.dot(ds.to(k2.dtype), k2, dq2, input_precision=DOT_PRECISION)
    return dq, dq2


@triton.jit
def _attn_bwd_dq_sequence(
    dq,
    dq2,
    q,
    q2,
    do,
    do2,
    lse,
    delta,
    k_base,
    v_base,
    stride_kn,
    stride_vn,
    pad_base,
    offs_m,
    offs_d,
    offs_d2,
    start_m,
    L,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_D2: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M2: tl.constexpr,
    BLOCK_N2: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # dQ contributions of the sequence keys for the query rows [start_m, start_m + BLOCK_M2).
    if CAUSAL:
        dq, dq2 = _attn_bwd_dq_inner(
            dq, dq2, q, q2, do, do2, lse, delta, k_base, v_base, stride_kn, stride_vn, pad_base, offs_m, offs_d,
            offs_d2, 0, start_m, L, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT, BLOCK_N2, False, False, HAS_PAD, DOT_PRECISION,
        )  # fmt: skip
        dq, dq2 = _attn_bwd_dq_inner(
            dq, dq2, q, q2, do, do2, lse, delta, k_base, v_base, stride_kn, stride_vn, pad_base, offs_m, offs_d,
            offs_d2, start_m, tl.minimum(start_m + BLOCK_M2, L), L, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT, BLOCK_N2, True, True, HAS_PAD, DOT_PRECISION,
        )  # fmt: skip
    else:
        l_full = (L // BLOCK_N2) * BLOCK_N2
        dq, dq2 = _attn_bwd_dq_inner(
            dq, dq2, q, q2, do, do2, lse, delta, k_base, v_base, stride_kn, stride_vn, pad_base, offs_m, offs_d,
            offs_d2, 0, l_full, L, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT, BLOCK_N2, False, False, HAS_PAD, DOT_PRECISION,
        )  # fmt: skip
        dq, dq2 = _attn_bwd_dq_inner(
            dq, dq2, q, q2, do, do2, lse, delta, k_base, v_base, stride_kn, stride_vn, pad_base, offs_m, offs_d,
            offs_d2, l_full, L, L, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT, BLOCK_N2, False, True, HAS_PAD, DOT_PRECISION,
        )  # fmt: skip
    return dq, dq2


@triton.jit
def _attn_bwd_dq(
    Q, K, V, PK, PV, DO, LSE, DELTA, PAD, DQ,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_pkh, stride_pkn,
    stride_pvh, stride_pvn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_padb,
    H, L, P,
    qk_scale, scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_D2: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M2: tl.constexpr,
    BLOCK_N2: tl.constexpr,
    BLOCK_P: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    start_m = tl.program_id(0) * BLOCK_M2
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    pk_base = PK + off_h * stride_pkh
    pv_base = PV + off_h * stride_pvh
    pad_base = PAD + off_b * stride_padb
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DO + off_b * stride_dob + off_h * stride_doh

    offs_m = start_m + tl.arange(0, BLOCK_M2)
    offs_d = tl.arange(0, BLOCK_D)
    offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
    q = _load_rows(q_base, offs_m, offs_d, stride_qm, L, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(do_base, offs_m, offs_d, stride_dom, L, HEAD_DIM, BLOCK_D, True)
    if SPLIT:
        q2 = _load_rows(q_base, offs_m, offs_d2, stride_qm, L, HEAD_DIM, BLOCK_D + BLOCK_D2, True)
        do2 = _load_rows(do_base, offs_m, offs_d2, stride_dom, L, HEAD_DIM, BLOCK_D + BLOCK_D2, True)
    else:
        q2 = tl.zeros([BLOCK_M2, BLOCK_D2], dtype=q.dtype)  # never read
        do2 = tl.zeros([BLOCK_M2, BLOCK_D2], dtype=do.dtype)
    lse = tl.load(LSE + off_bh.to(tl.int64) * L + offs_m, mask=offs_m < L, other=float("inf"))
    delta = tl.load(DELTA + off_bh.to(tl.int64) * L + offs_m, mask=offs_m < L, other=0.0)
    dq = tl.zeros([BLOCK_M2, BLOCK_D], dtype=tl.float32)
    dq2 = tl.zeros([BLOCK_M2, BLOCK_D2], dtype=tl.float32)

    p_full = (P // BLOCK_P) * BLOCK_P
    dq, dq2 = _attn_bwd_dq_inner(
        dq, dq2, q, q2, do, do2, lse, delta, pk_base, pv_base, stride_pkn, stride_pvn, pad_base, offs_m, offs_d,
        offs_d2, 0, p_full, P, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT, BLOCK_P, False, False, False, DOT_PRECISION,
    )  # fmt: skip
    dq, dq2 = _attn_bwd_dq_inner(
        dq, dq2, q, q2, do, do2, lse, delta, pk_base, pv_base, stride_pkn, stride_pvn, pad_base, offs_m, offs_d,
        offs_d2, p_full, P, P, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT, BLOCK_P, False, True, False, DOT_PRECISION,
    )  # fmt: skip
    dq, dq2 = _attn_bwd_dq_sequence(
        dq, dq2, q, q2, do, do2, lse, delta, k_base, v_base, stride_kn, stride_vn, pad_base, offs_m, offs_d, offs_d2,
        start_m, L, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT, BLOCK_M2, BLOCK_N2, CAUSAL, HAS_PAD, DOT_PRECISION,
    )  # fmt: skip
    dq_base = DQ + off_b * stride_dqb + off_h * stride_dqh
    _store_rows(dq_base, (dq * scale).to(DQ.dtype.element_ty), offs_m, offs_d, stride_dqm, L, HEAD_DIM, BLOCK_D)
    if SPLIT:
        _store_rows(dq_base, (dq2 * scale).to(DQ.dtype.element_ty), offs_m, offs_d2, stride_dqm, L, HEAD_DIM,
                    BLOCK_D + BLOCK_D2)  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# launch configuration
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters; every block is a power of two >= 16 (tl.dot's minimum)."""

    block_m: int  # forward: query rows per program
    block_n: int  # forward: sequence keys per tile; divides block_m (aligned causal diagonal)
    block_p: int  # prefix keys per tile, in every pass
    block_m1: int  # dK/dV and dprefix: query rows per step; divides block_n1
    block_n1: int  # dK/dV: sequence keys per program
    block_m2: int  # dQ: query rows per program
    block_n2: int  # dQ: keys per step; divides block_m2
    prefix_splits: int  # dprefix: programs per (prefix tile, head); their fp32 partials are summed
    fwd_warps: int = 4
    bwd_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        blocks = ("block_m", "block_n", "block_p", "block_m1", "block_n1", "block_m2", "block_n2")
        for name in blocks:
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"KernelConfig.{name}={value}: must be a power of two >= 16")
        for big, small in (("block_m", "block_n"), ("block_n1", "block_m1"), ("block_m2", "block_n2")):
            if getattr(self, big) % getattr(self, small):
                raise ValueError(f"KernelConfig: {small} must divide {big}")
        if self.prefix_splits < 1:
            raise ValueError("KernelConfig.prefix_splits must be >= 1")


def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(max(n, 1)))


def head_dim_parts(head_dim: int) -> tuple[int, int, bool]:
    """(BLOCK_D, BLOCK_D2, SPLIT): the head dim as a power-of-two part plus, where that saves work over one
    padded power-of-two tile, a second power-of-two part (80 = 64 + 16, 96 = 64 + 32, 48 = 32 + 16). Every
    part is at least 16 wide (tl.dot's minimum). Without a split BLOCK_D2 is a 16-wide dummy no code reads."""
    whole = _pow2_at_least_16(head_dim)
    first = max(16, 1 << (max(head_dim, 1).bit_length() - 1))  # the largest power of two <= D, at least 16
    rest = head_dim - first
    if rest > 0 and first + _pow2_at_least_16(rest) < whole:
        return first, _pow2_at_least_16(rest), True
    return whole, 16, False


def head_dim_work(head_dim: int) -> int:
    """The head-dim width the kernels' dots run at: D itself for 80 (64 + 16) or 96, 128 for 112 or 128."""
    block_d, block_d2, split = head_dim_parts(head_dim)
    return block_d + (block_d2 if split else 0)


@functools.cache
def _multiprocessor_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_config(
    batch: int,
    heads: int,
    seq_len: int,
    prefix_len: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> KernelConfig:
    """Tile sizes: on sm_90 the measured choice for the shape class where `tuned_sm90.json` has one (see
    `shape_class`), else the heuristic below (sm_80 / sm_90).

    The heuristic is checked by compiling every kernel for sm_90a offline (ptxas -v, no GPU at hand): its
    choices fit in shared memory and do not spill registers (a few bytes at most) for D in {64, 80, 128} in
    bf16 / fp16 / fp32 at the benchmark shapes. Not timed on hardware yet.
    """
    if device.type == "cuda" and _capability(device) == (9, 0):
        tiles = tuned_sm90().get(shape_class(seq_len, head_dim, dtype))
        if tiles is not None:
            return candidate_config(tiles, batch, heads, seq_len, prefix_len, head_dim, dtype, device)
    return _heuristic_config(batch, heads, seq_len, prefix_len, head_dim, dtype, device)


def _heuristic_config(
    batch: int,
    heads: int,
    seq_len: int,
    prefix_len: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> KernelConfig:
    if device.type != "cuda":
        # Interpreter: the smallest tiles, so that tiny test shapes still cross several blocks.
        n_q_blocks = triton.cdiv(seq_len, 16)
        return KernelConfig(16, 16, 16, 16, 16, 16, 16, prefix_splits=max(1, min(3, batch * n_q_blocks)))
    wide = head_dim_work(head_dim) > 64  # D = 80 runs as 64 + 16, D = 96 as 64 + 32
    seq_tile = _pow2_at_least_16(seq_len)
    block_p = min(64, _pow2_at_least_16(prefix_len))
    if dtype == torch.float32 and wide:
        # fp32 "ieee" dots run on FMA units with operands in registers: beyond 16-row tiles at D = 128
        # ptxas spills kilobytes per thread.
        block_m = block_n = block_p = block_m1 = block_n1 = block_m2 = block_n2 = 16
    elif dtype == torch.float32:
        block_m = block_n = block_m2 = block_n2 = block_n1 = min(32, seq_tile)
        block_p = min(32, block_p)
        block_m1 = 16
    else:
        block_m = min(128, seq_tile)
        block_n = min(64, block_m)
        block_n1 = min(64 if wide else 128, seq_tile)
        block_m1 = min(32, block_n1)
        block_m2 = min(128, seq_tile)
        block_n2 = min(32, block_m2)
    # dprefix: ~4 programs per SM in total, independent of the batch size (fewer partials to sum).
    n_prefix_tiles = max(1, triton.cdiv(prefix_len, block_p))
    n_items = batch * triton.cdiv(seq_len, block_m1)
    sms = _multiprocessor_count(device)
    splits = max(1, min(n_items, triton.cdiv(4 * sms, heads * n_prefix_tiles)))
    return KernelConfig(
        block_m, block_n, block_p, block_m1, block_n1, block_m2, block_n2,
        prefix_splits=splits,
        fwd_warps=8 if wide and dtype != torch.float32 and block_m >= 64 else 4,
        bwd_warps=4 if dtype == torch.float32 else 8,
        num_stages=2 if dtype == torch.float32 else 3,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# sm_90: a fixed, measured choice of tiles per shape class
# ---------------------------------------------------------------------------------------------------
#
# Not triton.autotune: its choice is made anew in every process, by timing, so two runs of one recipe could
# launch different tiles (and sum in different orders). Instead `launchers/gpu_check.py tune` times every
# candidate below on an H100 / H200 for each shape class used in training, and writes the fastest per class
# to tuned_sm90.json beside this file; that file is committed, and every later run reads the same choice.
# A class without an entry (or no file: nothing has been measured yet) uses the heuristic.

# Tile candidates for 16-bit inputs: (block_m, block_n, block_m1, block_n1, block_m2, block_n2, fwd_warps,
# bwd_warps, num_stages), each clamped to the sequence like the heuristic. Compiled for sm_90a offline at the
# training shapes by tests/kernels/test_prefix_attention.py (shared memory within 227 KiB).
SM90_CANDIDATES: tuple[tuple[int, ...], ...] = (
    (64, 32, 16, 64, 64, 16, 4, 4, 2),
    (64, 64, 32, 64, 64, 32, 4, 8, 3),
    (128, 64, 32, 64, 128, 32, 8, 8, 3),
    (128, 64, 32, 128, 128, 32, 8, 8, 2),
)
TUNED_SM90_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned_sm90.json")


def shape_class(seq_len: int, head_dim: int, dtype: torch.dtype) -> str:
    """The key of the sm_90 table: dtype, the head-dim work width, and the sequence's power-of-two bucket
    (16 .. 4096+), e.g. "bfloat16/d80/L64" for BLIP-2 OPT-2.7B captions."""
    bucket = min(4096, _pow2_at_least_16(seq_len))
    return f"{str(dtype).removeprefix('torch.')}/d{head_dim_work(head_dim)}/L{bucket}"


@functools.cache
def tuned_sm90() -> dict[str, tuple[int, ...]]:
    """shape class -> tile tuple, from tuned_sm90.json (read once per process); empty when not measured."""
    if not os.path.isfile(TUNED_SM90_FILE):
        return {}
    import json

    with open(TUNED_SM90_FILE) as f:
        data = json.load(f)
    return {key: tuple(entry["tiles"]) for key, entry in data.get("classes", {}).items()}


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def candidate_config(
    tiles: tuple[int, ...],
    batch: int,
    heads: int,
    seq_len: int,
    prefix_len: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> KernelConfig:
    """The KernelConfig of one SM90_CANDIDATES entry at this shape: tiles clamped to the sequence (keeping the
    divisibility rules), the prefix tile and dprefix splits as in the heuristic."""
    block_m, block_n, block_m1, block_n1, block_m2, block_n2, fwd_warps, bwd_warps, stages = tiles
    seq_tile = _pow2_at_least_16(seq_len)
    block_m, block_n1, block_m2 = (min(t, seq_tile) for t in (block_m, block_n1, block_m2))
    block_n, block_m1, block_n2 = min(block_n, block_m), min(block_m1, block_n1), min(block_n2, block_m2)
    block_p = min(64, _pow2_at_least_16(prefix_len))
    n_prefix_tiles = max(1, triton.cdiv(prefix_len, block_p))
    n_items = batch * triton.cdiv(seq_len, block_m1)
    sms = _multiprocessor_count(device) if device.type == "cuda" else 4  # the interpreter: any small number
    splits = max(1, min(n_items, triton.cdiv(4 * sms, heads * n_prefix_tiles)))
    return KernelConfig(block_m, block_n, block_p, block_m1, block_n1, block_m2, block_n2, prefix_splits=splits,
                        fwd_warps=fwd_warps, bwd_warps=bwd_warps, num_stages=stages)


def config_tiles(cfg: KernelConfig) -> tuple[int, ...]:
    """A config as an SM90_CANDIDATES-style tile tuple (the form tuned_sm90.json stores)."""
    return (cfg.block_m, cfg.block_n, cfg.block_m1, cfg.block_n1, cfg.block_m2, cfg.block_n2, cfg.fwd_warps,
            cfg.bwd_warps, cfg.num_stages)


def describe_launch(
    batch: int,
    heads: int,
    seq_len: int,
    prefix_len: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, object]:
    """What `prefix_attention` launches at this shape: the config, its source and the head-dim parts."""
    device = torch.device(device)
    cfg = default_config(batch, heads, seq_len, prefix_len, head_dim, dtype, device)
    tuned = (device.type == "cuda" and _capability(device) == (9, 0)
             and shape_class(seq_len, head_dim, dtype) in tuned_sm90())
    block_d, block_d2, split = head_dim_parts(head_dim)
    return {"config": dataclasses.asdict(cfg), "source": "tuned_sm90.json" if tuned else "heuristic",
            "shape_class": shape_class(seq_len, head_dim, dtype), "block_d": block_d,
            "block_d2": block_d2 if split else 0, "head_dim_work": head_dim_work(head_dim)}


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's matmul precision setting, so fp32 results match torch's by default.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


# ---------------------------------------------------------------------------------------------------
# raw ops
# ---------------------------------------------------------------------------------------------------


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"prefix_attention: {message}")


def _interpreting() -> bool:
    # Triton decides at @triton.jit time, not at call time: for these kernels at this module's import,
    # for tl.* helpers (tl.zeros, ...) at triton.language's. Both must have been interpreted, and the
    # variable must still be set (the interpreter reads it while running, too).
    import triton.language.standard as tl_standard
    from triton.runtime.interpreter import InterpretedFunction

    return (
        os.environ.get("TRITON_INTERPRET", "0") == "1"
        and isinstance(_attn_fwd, InterpretedFunction)
        and isinstance(tl_standard.zeros, InterpretedFunction)
    )


def triton_available(device: torch.device | str) -> bool:
    """True when the Triton kernels can run on tensors of `device`.

    CUDA devices need a CUDA-enabled torch. CPU tensors run only under the Triton interpreter (slow; for
    tests): TRITON_INTERPRET=1 set before triton and this module were imported, and still set now.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and _interpreting()


# Every buffer a kernel writes is allocated through these two, so tests can pre-fill them with NaN and
# catch any element a kernel forgets to write.
_empty = torch.empty
_empty_like = torch.empty_like

_PRE_BLOCK_M = 32  # Delta rows per program: two (32, 128) tiles fit in registers at 4 warps

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
) -> None:
    _require(q.dim() == 4, f"q must be (B, H, L, D), got shape {tuple(q.shape)}")
    _require(
        k.shape == q.shape and v.shape == q.shape,
        f"k and v must have q's shape {tuple(q.shape)}, got {tuple(k.shape)} and {tuple(v.shape)}",
    )
    batch, heads, seq_len, head_dim = q.shape
    _require(
        prefix_k.dim() == 3 and prefix_k.shape[0] == heads and prefix_k.shape[2] == head_dim,
        f"prefix_k must be (H, P, D) = ({heads}, P, {head_dim}), got {tuple(prefix_k.shape)}",
    )
    _require(
        prefix_v.shape == prefix_k.shape,
        f"prefix_v {tuple(prefix_v.shape)} != prefix_k {tuple(prefix_k.shape)}",
    )
    _require(batch > 0 and heads > 0 and seq_len > 0, f"empty input shape {tuple(q.shape)}")
    _require(1 <= head_dim <= 128, f"head dim {head_dim} not supported (1..128)")
    tensors = {"q": q, "k": k, "v": v, "prefix_k": prefix_k, "prefix_v": prefix_v}
    _require(q.dtype in _DTYPES, f"dtype {q.dtype} not supported; use one of {_DTYPES}")
    for name, t in tensors.items():
        _require(t.dtype == q.dtype, f"{name} has dtype {t.dtype}, q has {q.dtype}")
        _require(t.device == q.device, f"{name} is on {t.device}, q on {q.device}")
        _require(
            t.numel() == 0 or t.stride(-1) == 1,
            f"{name} needs a contiguous last dim, got strides {t.stride()}",
        )
    _require(
        triton_available(q.device),
        f"Triton cannot run on {q.device} (CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before "
        "importing ptscale_kernels); use prefix_attention_reference instead",
    )
    if key_padding_mask is not None:
        _require(
            key_padding_mask.dtype == torch.bool and key_padding_mask.shape == (batch, seq_len),
            f"key_padding_mask must be bool (B, L) = ({batch}, {seq_len}), got {key_padding_mask.dtype} "
            f"{tuple(key_padding_mask.shape)}",
        )
        _require(key_padding_mask.device == q.device, f"key_padding_mask is on {key_padding_mask.device}")


def _d_parts(head_dim: int) -> dict[str, int | bool]:
    block_d, block_d2, split = head_dim_parts(head_dim)
    return {"BLOCK_D": block_d, "BLOCK_D2": block_d2, "SPLIT": split}


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _prefix_args(prefix_k: torch.Tensor, prefix_v: torch.Tensor, q: torch.Tensor) -> tuple:
    # With P = 0 no prefix element is ever read; q stands in for a possibly-null data pointer.
    if prefix_k.shape[1] == 0:
        return q, q, 0, 0, 0, 0
    return prefix_k, prefix_v, prefix_k.stride(0), prefix_k.stride(1), prefix_v.stride(0), prefix_v.stride(1)


def _pad_args(key_padding_mask: torch.Tensor | None, q: torch.Tensor) -> tuple[torch.Tensor, int]:
    if key_padding_mask is None:
        return q, 0
    pad = key_padding_mask.contiguous().view(torch.uint8)
    return pad, pad.stride(0)


def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    cfg: KernelConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns o (B, H, L, D) in q's dtype and the base-2 row LSE (B, H, L) in fp32."""
    batch, heads, seq_len, head_dim = q.shape
    prefix_len = prefix_k.shape[1]
    o = _empty_like(q)
    lse = _empty((batch, heads, seq_len), device=q.device, dtype=torch.float32)
    pk, pv, s_pkh, s_pkn, s_pvh, s_pvn = _prefix_args(prefix_k, prefix_v, q)
    pad, s_padb = _pad_args(key_padding_mask, q)
    grid = (triton.cdiv(seq_len, cfg.block_m), batch * heads)
    _attn_fwd[grid](
        q, k, v, pk, pv, pad, o, lse,
        *_strides3(q), *_strides3(k), *_strides3(v),
        s_pkh, s_pkn, s_pvh, s_pvn,
        s_padb,
        *_strides3(o),
        heads, seq_len, prefix_len,
        scale * LOG2E,
        HEAD_DIM=head_dim, **_d_parts(head_dim),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_P=cfg.block_p,
        CAUSAL=causal, HAS_PAD=key_padding_mask is not None, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=cfg.fwd_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return o, lse


def _backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    o: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    scale: float,
    cfg: KernelConfig,
    need_dq: bool = True,
    need_dkdv: bool = True,
    need_dprefix: bool = True,
) -> tuple[torch.Tensor | None, ...]:
    """Returns (dq, dk, dv, dprefix_k, dprefix_v); a gradient not asked for is None and not computed."""
    batch, heads, seq_len, head_dim = q.shape
    prefix_len = prefix_k.shape[1]
    if do.stride(-1) != 1:
        do = do.contiguous()
    parts = _d_parts(head_dim)
    precision = _dot_precision(q.dtype)
    qk_scale = scale * LOG2E
    has_pad = key_padding_mask is not None
    pk, pv, s_pkh, s_pkn, s_pvh, s_pvn = _prefix_args(prefix_k, prefix_v, q)
    pad, s_padb = _pad_args(key_padding_mask, q)

    delta = _empty_like(lse)
    _attn_bwd_preprocess[(triton.cdiv(seq_len, _PRE_BLOCK_M), batch * heads)](
        o, do, delta, *_strides3(o), *_strides3(do), heads, seq_len,
        HEAD_DIM=head_dim, **parts, BLOCK_M=_PRE_BLOCK_M,
    )  # fmt: skip

    dq = dk = dv = dpk = dpv = None
    if need_dkdv:
        dk = _empty_like(k)
        dv = _empty_like(v)
        _attn_bwd_dkdv[(triton.cdiv(seq_len, cfg.block_n1), batch * heads)](
            q, k, v, do, lse, delta, pad, dk, dv,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dk), *_strides3(dv),
            s_padb,
            heads, seq_len,
            qk_scale, scale,
            HEAD_DIM=head_dim, **parts, BLOCK_M1=cfg.block_m1, BLOCK_N1=cfg.block_n1,
            CAUSAL=causal, HAS_PAD=has_pad, DOT_PRECISION=precision,
            num_warps=cfg.bwd_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    if need_dprefix:
        n_q_blocks = triton.cdiv(seq_len, cfg.block_m1)
        total_items = batch * n_q_blocks
        splits = min(cfg.prefix_splits, total_items)
        items_per_split = triton.cdiv(total_items, splits)
        splits = triton.cdiv(total_items, items_per_split)  # no split left with nothing to do
        # fp32 partials per split, reduced by torch: deterministic, no atomics.
        dpk_part = _empty((splits, heads, prefix_len, head_dim), device=q.device, dtype=torch.float32)
        dpv_part = _empty_like(dpk_part)
        if prefix_len > 0:
            _attn_bwd_dprefix[(triton.cdiv(prefix_len, cfg.block_p), heads, splits)](
                q, pk, pv, do, lse, delta, dpk_part, dpv_part,
                *_strides3(q), s_pkh, s_pkn, s_pvh, s_pvn, *_strides3(do),
                heads, seq_len, prefix_len,
                n_q_blocks, total_items, items_per_split,
                qk_scale, scale,
                HEAD_DIM=head_dim, **parts, BLOCK_M1=cfg.block_m1, BLOCK_P=cfg.block_p,
                DOT_PRECISION=precision,
                num_warps=cfg.bwd_warps, num_stages=cfg.num_stages,
            )  # fmt: skip
        dpk = dpk_part.sum(0).to(prefix_k.dtype)
        dpv = dpv_part.sum(0).to(prefix_v.dtype)
    if need_dq:
        dq = _empty_like(q)
        _attn_bwd_dq[(triton.cdiv(seq_len, cfg.block_m2), batch * heads)](
            q, k, v, pk, pv, do, lse, delta, pad, dq,
            *_strides3(q), *_strides3(k), *_strides3(v),
            s_pkh, s_pkn, s_pvh, s_pvn,
            *_strides3(do), *_strides3(dq),
            s_padb,
            heads, seq_len, prefix_len,
            qk_scale, scale,
            HEAD_DIM=head_dim, **parts, BLOCK_M2=cfg.block_m2, BLOCK_N2=cfg.block_n2,
            BLOCK_P=cfg.block_p, CAUSAL=causal, HAS_PAD=has_pad, DOT_PRECISION=precision,
            num_warps=cfg.bwd_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    return dq, dk, dv, dpk, dpv


# ---------------------------------------------------------------------------------------------------
# autograd.Function and public function
# ---------------------------------------------------------------------------------------------------


class _PrefixAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        prefix_k: torch.Tensor,
        prefix_v: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        causal: bool,
        scale: float,
        cfg: KernelConfig,
    ) -> torch.Tensor:
        with torch.cuda.device_of(q):  # Triton launches on the current device; make it q's
            o, lse = _forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, cfg)
        # The prefix is saved as the (H, P, D) parameter it is; nothing batch-sized but o and lse.
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, o, lse, key_padding_mask)
        ctx.causal = causal
        ctx.scale = scale
        ctx.cfg = cfg
        return o

    @staticmethod
    def backward(ctx, do: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, prefix_k, prefix_v, o, lse, key_padding_mask = ctx.saved_tensors
        need = ctx.needs_input_grad
        with torch.cuda.device_of(q):
            dq, dk, dv, dpk, dpv = _backward(
                do, q, k, v, prefix_k, prefix_v, key_padding_mask, o, lse, ctx.causal, ctx.scale, ctx.cfg,
                need_dq=need[0], need_dkdv=need[1] or need[2], need_dprefix=need[3] or need[4],
            )  # fmt: skip
        return (
            dq,
            dk if need[1] else None,
            dv if need[2] else None,
            dpk if need[3] else None,
            dpv if need[4] else None,
            None,
            None,
            None,
            None,
        )


def _prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """`prefix_attention` with an explicit launch configuration (tests and tuning)."""
    _check_inputs(q, k, v, prefix_k, prefix_v, key_padding_mask)
    batch, heads, seq_len, head_dim = q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if config is None:
        config = default_config(batch, heads, seq_len, prefix_k.shape[1], head_dim, q.dtype, q.device)
    return _PrefixAttention.apply(q, k, v, prefix_k, prefix_v, key_padding_mask, bool(causal), float(scale), config)


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of every query over a batch-shared prefix plus the masked sequence, fused in Triton.

    Args:
        q, k, v: (B, H, L, D) — batch, heads, sequence length, head dim. Any strides as long as the
            last dim is contiguous (stride 1), so `x.view(B, L, H, D).transpose(1, 2)` is fine.
        prefix_k, prefix_v: (H, P, D), shared by the whole batch and read in place (never expanded to
            the batch or concatenated with k / v). P >= 0; any P works, P = 0 is plain attention.
        key_padding_mask: optional (B, L) bool, True = real token. Padded *keys* are never attended.
            Queries are not masked: a padded query row attends like any other row (to the prefix and
            to the real keys it may see), so its output is finite and its gradient is the exact
            gradient of that output; pass dO = 0 there (as any loss that ignores padding does) and
            it contributes nothing to the other gradients. Prefix keys are never padded.
        causal: if True, query i sees sequence keys 0..i; every query always sees all P prefix keys.
            This is flash-attn's bottom-right-aligned causal mask on the concatenation [prefix, seq].
        scale: softmax scale; default 1 / sqrt(D).

    Returns:
        o: (B, H, L, D) in q's dtype, with q's memory layout when q is dense (so a (B, L, H, D)-major q
        gives a (B, L, H, D)-major o, and `o.transpose(1, 2)` is contiguous). A row that sees no key
        at all (only possible with P = 0) is zero, as in torch SDPA, with zero gradients.

    Backward gives dq, dk, dv and dprefix_k, dprefix_v (H, P, D) summed over the batch; dprefix is
    reduced from fp32 per-split partials by torch, so all gradients are deterministic run to run.
    Gradients not required (`requires_grad=False`) are not computed.

    Supported: fp16, bf16, fp32 (fp32 uses TF32 tensor cores only when
    `torch.get_float32_matmul_precision()` is not "highest"); head dims up to 128 (a non power of two runs
    as two power-of-two parts where that saves work, 80 = 64 + 16 and 96 = 64 + 32, else padded: 112 as
    128; see `head_dim_parts`); any L and P. Runs on CUDA
    tensors, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 set before import;
    slow, for tests). Raises ValueError, before launching anything, on any shape / dtype / device /
    layout violation; it never falls back to the reference silently.
    """
    return _prefix_attention(q, k, v, prefix_k, prefix_v, key_padding_mask=key_padding_mask, causal=causal, scale=scale)
