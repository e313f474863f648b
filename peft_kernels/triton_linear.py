"""Fused Triton kernels for LoRA and DoRA linear layers (forward and backward).

Notation: x (M, in), W (out, in), b (out,), A (r, in), B (out, r), m (out,), n (out,) the
precomputed weight norm (a constant), c = m / n, s the scaling, p the dropout probability.
Dropout keeps x[i, k] iff ``tl.rand(seed, i * in + k) >= p`` and rescales by 1 / (1 − p):
x̃ = x ⊙ keep / (1 − p). Masks are never stored: every kernel that needs one regenerates it
from the seed (Philox is counter-based, so any tile of the mask can be drawn anywhere).

Forward (2 launches):
    u = x̃ Aᵀ                                                     ``_lora_down_kernel``
    acc = [x | u] · [W | s·B]ᵀ  (one extended reduction, in + r)  ``_fused_linear_fwd_kernel``
    LoRA:           y = acc + b
    DoRA, p = 0:    base = acc,              y = c ⊙ base + b
    DoRA, p > 0:    base = x̃ Wᵀ + s·u Bᵀ,    y = (x − x̃) Wᵀ + c ⊙ base + b   (peft's definition)

Backward (3 launches, 2 without grad_x). With G = grad_y ⊙ c (c = 1 for LoRA), applied as
grad_y tiles are loaded and never materialised, and grad_u = s·G B (the gradient of u):
    grad_u, grad_B = s·Gᵀu, grad_m = Σ_M grad_y ⊙ base / n, grad_b = Σ_M grad_y
        one pass over grad_y                                      ``_lora_bwd_dy_kernel``
    grad_x = [G | grad_u] · [W ; A]   (extended reduction, out + r)
        p > 0: grad_x = grad_y W + [(grad_y ⊙ (c − 1)) W + grad_u A] ⊙ keep / (1 − p)
                                                                  ``_lora_grad_x_kernel``
    grad_A = grad_uᵀ x̃   (a reduction over M)                     ``_lora_grad_a_kernel``

All dots accumulate in fp32. fp32 operands use exact IEEE products (like torch's default fp32
matmul) unless torch's float32 matmul precision allows TF32. Reductions that cross programs
(grad_B, grad_m, grad_b, grad_A and, when ``out`` is split across programs, grad_u) go
through ``tl.atomic_add`` into zeroed fp32 buffers, so their summation order (last bits) is
not deterministic run to run.

Dtypes: x, W, b and y share the compute dtype; A, B, m and u the adapter dtype (the compute dtype
or float32). With float32 adapters on a bfloat16 base, the rank-r parts of every dot (u, grad_u,
the A and B tiles) stay float32, the dense parts run on bfloat16 tiles: the adapter branch is
never rounded to bfloat16, the base GEMMs keep their speed.

This module implements ``peft_kernels.contract`` (``forward``, ``backward``); the reusable pieces
(autotune configs, tile helpers, the Philox mask) live in ``peft_kernels.triton_common``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from peft_kernels.contract import Forward, Grads, Saved
from peft_kernels.triton_common import (
    DY_CONFIGS,
    GEMM_CONFIGS,
    GEMM_PRUNE,
    GROUP_M,
    INTERPRET,
    SKINNY_CONFIGS,
    block_r,
    block_range,
    check_dropout,
    dot_precision,
    dropout_keep_mask,
    grouped_tile,
    keep_mask,
    low_rank_update,
    mma,
    mma_wide,
    splits,
    target_programs,
)

__all__ = ["INTERPRET", "backward", "dora_keeps_base", "dropout_keep_mask", "forward"]


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.autotune(configs=SKINNY_CONFIGS, key=["M_BUCKET", "K", "R", "HAS_DROPOUT"])
@triton.jit
def _lora_down_kernel(
    # pointers
    x_ptr,
    a_ptr,
    u_ptr,
    seed_ptr,
    # sizes
    M,
    K,
    R,
    M_BUCKET,  # next power of two of M: autotune key only
    # strides
    stride_xm,
    stride_xk,
    stride_ar,
    stride_ak,
    # dropout probability
    p,
    # meta-parameters
    HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """u[M, R] = x̃ Aᵀ; grid (M / BLOCK_M, R / BLOCK_R).

    Dropped entries are zeroed in the x tile (exact) and the 1 / (1 − p) rescale is applied
    once to the accumulator instead of to every element.
    """
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_r = offs_r < R
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    a_ptrs = a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar  # Aᵀ tile
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = k0 + offs_k < K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(keep_mask(seed, offs_m, k0 + offs_k, K, p), x, tl.zeros_like(x))
        a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = mma(x, a, acc, DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    if HAS_DROPOUT:
        acc = acc * (1.0 / (1.0 - p))
    u_ptrs = u_ptr + offs_m[:, None].to(tl.int64) * R + offs_r[None, :]
    tl.store(u_ptrs, acc.to(u_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


@triton.autotune(
    configs=GEMM_CONFIGS,
    key=["M_BUCKET", "N", "K", "R", "DORA", "HAS_DROPOUT"],
    prune_configs_by=GEMM_PRUNE,
)
@triton.jit
def _fused_linear_fwd_kernel(
    # pointers
    x_ptr,
    w_ptr,
    u_ptr,
    b_ptr,
    bias_ptr,
    mag_ptr,
    norm_ptr,  # inputs
    y_ptr,
    base_ptr,  # outputs (contiguous)
    seed_ptr,
    # sizes
    M,
    N,
    K,
    R,
    M_BUCKET,  # next power of two of M: autotune key only
    # strides
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_um,
    stride_ur,
    stride_bn,
    stride_br,
    # scalars
    scaling,
    p,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    DORA: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y[M, N] from the extended reduction [x | u] · [W | s·B]ᵀ (K = in, then R = rank).

    DORA stores base (the pre-scale accumulator) and writes y = c ⊙ base (+ b).
    HAS_DROPOUT (DoRA only: LoRA's dropout lives in the down kernel) keeps two accumulators
    fed by the same x tile: x Wᵀ and x̃ Wᵀ (masked copy of the tile); after the K loop they
    become (x − x̃) Wᵀ and x̃ Wᵀ, and the rank-r tail lands in the latter (→ base).
    """
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :].to(tl.int64) * stride_wn
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        acc_x = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # x Wᵀ, then (x − x̃) Wᵀ

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = k0 + offs_k < K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # Wᵀ tile
        if HAS_DROPOUT:
            acc_x = mma(x, w, acc_x, DOT_PRECISION)
            keep = keep_mask(seed, offs_m, k0 + offs_k, K, p)
            x = tl.where(keep, x, tl.zeros_like(x))
        acc = mma(x, w, acc, DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_DROPOUT:
        acc = acc * (1.0 / (1.0 - p))  # x̃ Wᵀ
        acc_x -= acc
    # rank-r tail of the reduction: + (s·u) Bᵀ
    acc = low_rank_update(
        acc,
        u_ptr,
        b_ptr,
        offs_m,
        offs_n,
        M,
        N,
        R,
        stride_um,
        stride_ur,
        stride_br,
        stride_bn,
        scaling,
        BLOCK_R,
        DOT_PRECISION,
    )

    out_offs = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    if DORA:
        tl.store(base_ptr + out_offs, acc.to(base_ptr.dtype.element_ty), mask=out_mask)
        mag = tl.load(mag_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        norm = tl.load(norm_ptr + offs_n, mask=mask_n, other=1.0).to(tl.float32)
        acc = acc * (mag / norm)[None, :]
        if HAS_DROPOUT:
            acc += acc_x
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + out_offs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.autotune(
    configs=DY_CONFIGS,
    key=["M_BUCKET", "N", "R", "DORA", "HAS_BIAS_GRAD"],
    # every trial accumulates into these: zero them before each one
    reset_to_zero=["grad_u_ptr", "grad_b_ptr", "grad_mag_ptr", "grad_bias_ptr"],
)
@triton.jit
def _lora_bwd_dy_kernel(
    # pointers
    dy_ptr,
    b_ptr,
    u_ptr,
    mag_ptr,
    norm_ptr,
    base_ptr,  # inputs
    grad_u_ptr,
    grad_b_ptr,
    grad_mag_ptr,
    grad_bias_ptr,  # zeroed fp32 accumulators
    # sizes
    M,
    N,
    R,
    M_BUCKET,  # next power of two of M: autotune key only
    # strides
    stride_dym,
    stride_dyn,
    stride_bn,
    stride_br,
    stride_um,
    stride_ur,
    stride_basem,
    stride_basen,
    # scalars
    scaling,
    # meta-parameters
    DORA: tl.constexpr,
    HAS_BIAS_GRAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """One pass over grad_y (N = out). Grid (M / BLOCK_M, out-splits, R / BLOCK_R).

    Each program keeps a (BLOCK_M, BLOCK_R) grad_u accumulator and walks its share of the out
    columns; per grad_y tile, G = grad_y ⊙ c (c = m / n, DoRA) is formed in registers and feeds
        grad_u[rows]     += s · G B[cols]          (kept in registers, one atomic add at the end)
        grad_B[cols]     += s · Gᵀ u[rows]         (atomic add)
        grad_m[cols]     += Σ_rows grad_y ⊙ base / n   (DORA, atomic add)
        grad_bias[cols]  += Σ_rows grad_y              (HAS_BIAS_GRAD, atomic add)
    """
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    rows64 = offs_m[:, None].to(tl.int64)
    u = tl.load(
        u_ptr + rows64 * stride_um + offs_r[None, :] * stride_ur,
        mask=mask_m[:, None] & mask_r[None, :],
        other=0.0,
    )

    acc_u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    n_start, n_stop = block_range(tl.cdiv(N, BLOCK_N), 1)
    for nb in range(n_start, n_stop):
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        tile_mask = mask_m[:, None] & mask_n[None, :]
        dy = tl.load(
            dy_ptr + rows64 * stride_dym + offs_n[None, :] * stride_dyn, mask=tile_mask, other=0.0
        )
        if DORA:
            mag = tl.load(mag_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            norm = tl.load(norm_ptr + offs_n, mask=mask_n, other=1.0).to(tl.float32)
            g = dy.to(tl.float32) * (mag / norm)[None, :]
        else:
            g = dy
        b = tl.load(
            b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
            mask=mask_n[:, None] & mask_r[None, :],
            other=0.0,
        )
        acc_u = mma(g, b, acc_u, DOT_PRECISION)
        part_b = mma(tl.trans(g), u, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32), DOT_PRECISION)
        tl.atomic_add(
            grad_b_ptr + offs_n[:, None] * R + offs_r[None, :],
            part_b * scaling,
            mask=mask_n[:, None] & mask_r[None, :],
        )
        if pid_r == 0:  # column reductions: done once, by the programs of the first rank block
            if DORA:
                base = tl.load(
                    base_ptr + rows64 * stride_basem + offs_n[None, :] * stride_basen,
                    mask=tile_mask,
                    other=0.0,
                )
                part_m = tl.sum(dy.to(tl.float32) * base.to(tl.float32), axis=0) / norm
                tl.atomic_add(grad_mag_ptr + offs_n, part_m, mask=mask_n)
            if HAS_BIAS_GRAD:
                tl.atomic_add(
                    grad_bias_ptr + offs_n, tl.sum(dy.to(tl.float32), axis=0), mask=mask_n
                )
    tl.atomic_add(
        grad_u_ptr + rows64 * R + offs_r[None, :],
        acc_u * scaling,
        mask=mask_m[:, None] & mask_r[None, :],
    )


@triton.autotune(
    configs=GEMM_CONFIGS,
    key=["M_BUCKET", "N", "K", "R", "DORA", "HAS_DROPOUT"],
    prune_configs_by=GEMM_PRUNE,
)
@triton.jit
def _lora_grad_x_kernel(
    # pointers
    dy_ptr,
    w_ptr,
    grad_u_ptr,
    a_ptr,
    mag_ptr,
    norm_ptr,  # inputs (grad_u: fp32, contiguous)
    grad_x_ptr,  # output (contiguous)
    seed_ptr,
    # sizes
    M,
    N,
    K,
    R,  # N = in (columns of grad_x), K = out (reduction)
    M_BUCKET,  # next power of two of M: autotune key only
    # strides
    stride_dym,
    stride_dyk,
    stride_wk,
    stride_wn,
    stride_ar,
    stride_an,
    # dropout probability
    p,
    # meta-parameters
    DORA: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """grad_x[M, N] from the extended reduction [G | grad_u] · [W ; A] (K = out, then R).

    Dropout masks the low-rank part (and, for DoRA, the (grad_y ⊙ (c − 1)) W part), the mask of
    this output tile being regenerated once, in the epilogue. Without DoRA the low-rank part is
    reduced first, masked in place, and the dense part joins the same accumulator; DoRA with
    dropout needs a second accumulator for the masked part.
    """
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    TWO_ACC: tl.constexpr = DORA and HAS_DROPOUT

    # the low-rank part first, grad_u A: it is then masked (LoRA) or waits in its own
    # accumulator for the masked (grad_y ⊙ (c − 1)) W part (DoRA with dropout)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = low_rank_update(
        acc,
        grad_u_ptr,
        a_ptr,
        offs_m,
        offs_n,
        M,
        N,
        R,
        R,
        1,
        stride_ar,
        stride_an,
        1.0,
        BLOCK_R,
        DOT_PRECISION,
    )
    if TWO_ACC:
        acc_keep = acc
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    elif HAS_DROPOUT:  # (the mask is drawn where it is used: never live across the K loop)
        keep = keep_mask(tl.load(seed_ptr), offs_m, offs_n, N, p)
        acc = tl.where(keep, acc * (1.0 / (1.0 - p)), 0.0)

    dy_ptrs = dy_ptr + offs_m[:, None].to(tl.int64) * stride_dym + offs_k[None, :] * stride_dyk
    w_ptrs = w_ptr + offs_k[:, None].to(tl.int64) * stride_wk + offs_n[None, :] * stride_wn
    for k0 in range(0, K, BLOCK_K):
        mask_k = k0 + offs_k < K
        dy = tl.load(dy_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if DORA:
            mag = tl.load(mag_ptr + k0 + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            norm = tl.load(norm_ptr + k0 + offs_k, mask=mask_k, other=1.0).to(tl.float32)
            c = (mag / norm)[None, :]
            if TWO_ACC:
                acc = mma(dy, w, acc, DOT_PRECISION)
                acc_keep = mma(dy.to(tl.float32) * (c - 1.0), w, acc_keep, DOT_PRECISION)
            else:
                acc = mma(dy.to(tl.float32) * c, w, acc, DOT_PRECISION)
        else:
            acc = mma(dy, w, acc, DOT_PRECISION)
        dy_ptrs += BLOCK_K * stride_dyk
        w_ptrs += BLOCK_K * stride_wk
    if TWO_ACC:
        keep = keep_mask(tl.load(seed_ptr), offs_m, offs_n, N, p)
        acc += tl.where(keep, acc_keep * (1.0 / (1.0 - p)), 0.0)

    out_ptrs = grad_x_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(out_ptrs, acc.to(grad_x_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.autotune(
    configs=SKINNY_CONFIGS,
    key=["M_BUCKET", "K", "R", "HAS_DROPOUT"],
    reset_to_zero=["grad_a_ptr"],  # accumulated with atomics across M-splits
)
@triton.jit
def _lora_grad_a_kernel(
    # pointers
    grad_u_ptr,
    x_ptr,  # grad_u: fp32, contiguous (M, R)
    grad_a_ptr,  # zeroed fp32 accumulator (R, K)
    seed_ptr,
    # sizes
    M,
    K,
    R,
    M_BUCKET,  # next power of two of M: autotune key only
    # strides
    stride_xm,
    stride_xk,
    # dropout probability
    p,
    # meta-parameters
    HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """grad_A[R, K] = grad_uᵀ x̃, reduced over M. Grid (K / BLOCK_K, R / BLOCK_R, M-splits).

    Each program reduces its share of the M blocks in registers and adds the partial sum into
    the fp32 buffer once; x̃ is rebuilt from x and the seed (1 / (1 − p) applied at the end).
    """
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_k = offs_k < K
    mask_r = offs_r < R
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)

    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    m_start, m_stop = block_range(tl.cdiv(M, BLOCK_M), 2)
    for mb in range(m_start, m_stop):
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        rows64 = offs_m.to(tl.int64)
        # grad_uᵀ tile (BLOCK_R, BLOCK_M), read transposed straight from the (M, R) buffer
        gu_t = tl.load(
            grad_u_ptr + rows64[None, :] * R + offs_r[:, None],
            mask=mask_r[:, None] & mask_m[None, :],
            other=0.0,
        )
        x = tl.load(
            x_ptr + rows64[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        if HAS_DROPOUT:
            x = tl.where(keep_mask(seed, offs_m, offs_k, K, p), x, tl.zeros_like(x))
        acc = mma_wide(gu_t, x, acc, DOT_PRECISION)
    if HAS_DROPOUT:
        acc = acc * (1.0 / (1.0 - p))
    tl.atomic_add(
        grad_a_ptr + offs_r[:, None] * K + offs_k[None, :],
        acc,
        mask=mask_r[:, None] & mask_k[None, :],
    )


# ---------------------------------------------------------------------------------------------
# Launchers: the peft_kernels.contract functions
# ---------------------------------------------------------------------------------------------


def dropout_state_spec(
    x_shape: tuple[int, ...], dropout_p: float
) -> tuple[tuple[int, ...], torch.dtype]:
    """The Philox seed, one int64; no dropout, an empty tensor."""
    return ((1,) if dropout_p > 0 else (0,)), torch.int64


def dora_keeps_base(dropout_p: float, dtype: torch.dtype, adapter_dtype: torch.dtype) -> bool:
    """The kernels read DoRA's pre-scale output base for grad_m, with or without dropout."""
    return True


def forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor | None,
    weight_norm: Tensor | None,
    *,
    scaling: float,
    dropout_p: float,
    seed: Tensor | None,
) -> Forward:
    """Two launches: ``u = x̃ Aᵀ``, then ``[x | u] · [W | s·B]ᵀ`` with the bias and DoRA's
    ``c = m / n`` in the epilogue (see the module docstring). The dropout state is the seed.
    """
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    assert weight.shape[1] == K and lora_A.shape[1] == K and lora_B.shape == (N, R)
    check_dropout(dropout_p, seed, M, K)
    dora = magnitude is not None
    has_dropout = dropout_p > 0.0
    meta = {"DOT_PRECISION": dot_precision(), "BLOCK_R": block_r(R)}
    m_bucket = triton.next_power_of_2(M)
    unused = x  # a placeholder pointer for arguments a variant never reads
    seed_arg = seed if has_dropout else unused

    u = torch.empty((M, R), device=x.device, dtype=lora_A.dtype)
    _lora_down_kernel[
        lambda META: (triton.cdiv(M, META["BLOCK_M"]), triton.cdiv(R, META["BLOCK_R"]))
    ](
        x_ptr=x,
        a_ptr=lora_A,
        u_ptr=u,
        seed_ptr=seed_arg,
        M=M,
        K=K,
        R=R,
        M_BUCKET=m_bucket,
        stride_xm=x.stride(0),
        stride_xk=x.stride(1),
        stride_ar=lora_A.stride(0),
        stride_ak=lora_A.stride(1),
        p=dropout_p,
        HAS_DROPOUT=has_dropout,
        **meta,
    )

    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    base = torch.empty((M, N), device=x.device, dtype=x.dtype) if dora else None
    _fused_linear_fwd_kernel[
        lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)
    ](
        x_ptr=x,
        w_ptr=weight,
        u_ptr=u,
        b_ptr=lora_B,
        bias_ptr=bias if bias is not None else unused,
        mag_ptr=magnitude if dora else unused,
        norm_ptr=weight_norm if dora else unused,
        y_ptr=y,
        base_ptr=base if dora else y,
        seed_ptr=seed_arg,
        M=M,
        N=N,
        K=K,
        R=R,
        M_BUCKET=m_bucket,
        stride_xm=x.stride(0),
        stride_xk=x.stride(1),
        stride_wn=weight.stride(0),
        stride_wk=weight.stride(1),
        stride_um=u.stride(0),
        stride_ur=u.stride(1),
        stride_bn=lora_B.stride(0),
        stride_br=lora_B.stride(1),
        scaling=scaling,
        p=dropout_p,
        HAS_BIAS=bias is not None,
        DORA=dora,
        HAS_DROPOUT=dora and has_dropout,
        GROUP_M=GROUP_M,
        **meta,
    )
    return Forward(y, u, seed if has_dropout else None, base)


def backward(
    grad_y: Tensor,
    saved: Saved,
    *,
    scaling: float,
    dropout_p: float,
    needs_grad_x: bool,
    needs_grad_bias: bool,
) -> Grads:
    """Three launches (two without grad_x), with G = grad_y ⊙ c and grad_u = s·G B:

        one pass over grad_y: grad_u, grad_B = s·Gᵀu, grad_m = Σ_M grad_y ⊙ base / n, grad_bias
        grad_x = [G | grad_u] · [W ; A]   (dropout: the mask, regenerated, on the masked part)
        grad_A = grad_uᵀ x̃

    The dropout state is the forward's seed; masks are regenerated, never stored.
    """
    x, weight, lora_A, lora_B, u = saved.x, saved.weight, saved.lora_A, saved.lora_B, saved.u
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    assert grad_y.shape == (M, N) and u.shape == (M, R)  # dropout_p and seed: checked in forward
    dora = saved.magnitude is not None
    has_dropout = dropout_p > 0.0
    meta = {"DOT_PRECISION": dot_precision(), "BLOCK_R": block_r(R)}
    m_bucket = triton.next_power_of_2(M)
    target = target_programs(x.device)
    unused = x
    seed_arg = saved.dropout_state if has_dropout else unused
    magnitude = saved.magnitude if dora else unused
    weight_norm = saved.weight_norm if dora else unused
    base = saved.dora_out
    f32 = {"device": x.device, "dtype": torch.float32}

    # 1) one pass over grad_y: grad_u = s·G B, grad_B, grad_m, grad_bias (fp32 accumulators).
    # Unused accumulators still get a real (tiny) tensor: autotune zeroes them between trials.
    grad_u = torch.zeros((M, R), **f32)
    grad_b = torch.zeros((N, R), **f32)
    grad_mag = torch.zeros(N if dora else 1, **f32)
    grad_bias = torch.zeros(N if needs_grad_bias else 1, **f32)

    def grid_dy(META):
        m_blocks = triton.cdiv(M, META["BLOCK_M"])
        r_blocks = triton.cdiv(R, META["BLOCK_R"])
        n_splits = splits(triton.cdiv(N, META["BLOCK_N"]), m_blocks * r_blocks, target)
        return (m_blocks, n_splits, r_blocks)

    _lora_bwd_dy_kernel[grid_dy](
        dy_ptr=grad_y,
        b_ptr=lora_B,
        u_ptr=u,
        mag_ptr=magnitude,
        norm_ptr=weight_norm,
        base_ptr=base if dora else unused,
        grad_u_ptr=grad_u,
        grad_b_ptr=grad_b,
        grad_mag_ptr=grad_mag,
        grad_bias_ptr=grad_bias,
        M=M,
        N=N,
        R=R,
        M_BUCKET=m_bucket,
        stride_dym=grad_y.stride(0),
        stride_dyn=grad_y.stride(1),
        stride_bn=lora_B.stride(0),
        stride_br=lora_B.stride(1),
        stride_um=u.stride(0),
        stride_ur=u.stride(1),
        stride_basem=base.stride(0) if dora else 0,
        stride_basen=base.stride(1) if dora else 0,
        scaling=scaling,
        DORA=dora,
        HAS_BIAS_GRAD=needs_grad_bias,
        **meta,
    )

    # 2) grad_x = [G | grad_u] · [W ; A] (with the dropout mask on the low-rank part)
    grad_x = None
    if needs_grad_x:
        grad_x = torch.empty((M, K), device=x.device, dtype=x.dtype)
        _lora_grad_x_kernel[
            lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(K, META["BLOCK_N"]),)
        ](
            dy_ptr=grad_y,
            w_ptr=weight,
            grad_u_ptr=grad_u,
            a_ptr=lora_A,
            mag_ptr=magnitude,
            norm_ptr=weight_norm,
            grad_x_ptr=grad_x,
            seed_ptr=seed_arg,
            M=M,
            N=K,
            K=N,
            R=R,
            M_BUCKET=m_bucket,
            stride_dym=grad_y.stride(0),
            stride_dyk=grad_y.stride(1),
            stride_wk=weight.stride(0),
            stride_wn=weight.stride(1),
            stride_ar=lora_A.stride(0),
            stride_an=lora_A.stride(1),
            p=dropout_p,
            DORA=dora,
            HAS_DROPOUT=has_dropout,
            GROUP_M=GROUP_M,
            **meta,
        )

    # 3) grad_A = grad_uᵀ x̃, reduced over M (split over M when K alone gives too few programs)
    grad_a = torch.zeros((R, K), **f32)

    def grid_a(META):
        k_blocks = triton.cdiv(K, META["BLOCK_K"])
        r_blocks = triton.cdiv(R, META["BLOCK_R"])
        m_splits = splits(triton.cdiv(M, META["BLOCK_M"]), k_blocks * r_blocks, target)
        return (k_blocks, r_blocks, m_splits)

    _lora_grad_a_kernel[grid_a](
        grad_u_ptr=grad_u,
        x_ptr=x,
        grad_a_ptr=grad_a,
        seed_ptr=seed_arg,
        M=M,
        K=K,
        R=R,
        M_BUCKET=m_bucket,
        stride_xm=x.stride(0),
        stride_xk=x.stride(1),
        p=dropout_p,
        HAS_DROPOUT=has_dropout,
        **meta,
    )
    return Grads(
        grad_x,
        grad_a.to(lora_A.dtype),
        grad_b.to(lora_B.dtype),
        grad_mag.to(saved.magnitude.dtype) if dora else None,
        grad_bias.to(grad_y.dtype) if needs_grad_bias else None,
    )
