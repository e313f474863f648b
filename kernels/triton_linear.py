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
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

# The interpreter (CPU) runs one small config: autotuning there would take minutes.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Widest rank tile; larger ranks are covered by several tiles (loops or extra programs).
_MAX_BLOCK_R = 64
_GROUP_M = 8  # row-blocks per group in the L2-friendly tile order of the GEMM kernels


def _configs(space: list[tuple[dict, int, int]], interpret: dict) -> list[triton.Config]:
    """Autotune configs from ``(meta, num_warps, num_stages)`` triples (Hopper / Ampere)."""
    if _INTERPRET:
        return [triton.Config(interpret, num_warps=4, num_stages=1)]
    return [triton.Config(meta, num_warps=w, num_stages=s) for meta, w, s in space]


def _mnk(bm: int, bn: int, bk: int) -> dict:
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}


# GEMM-shaped kernels (forward y, grad_x): tensor-core tiles.
_GEMM_CONFIGS = _configs(
    [
        (_mnk(128, 256, 64), 8, 3),
        (_mnk(256, 128, 64), 8, 3),
        (_mnk(128, 128, 64), 8, 3),
        (_mnk(128, 128, 64), 4, 4),
        (_mnk(64, 128, 64), 4, 4),
        (_mnk(128, 64, 64), 4, 4),
        (_mnk(64, 64, 64), 4, 3),
    ],
    interpret=_mnk(16, 16, 32),
)


def _prune_fp32_tiles(configs: list[triton.Config], named_args: dict, **kwargs) -> list:
    """fp32 IEEE dots run on the FMA units with operands in registers: wide tiles only spill.

    For fp32 activations keep the GEMM tiles of at most 2048 outputs per warp.
    """
    act = named_args.get("x_ptr", named_args.get("dy_ptr"))
    if act is None or act.dtype != torch.float32 or kwargs.get("DOT_PRECISION") != "ieee":
        return configs
    return [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 2048 * c.num_warps]


# perf_model and top_k spelled out: older triton releases read them without defaults
_GEMM_PRUNE = {"early_config_prune": _prune_fp32_tiles, "perf_model": None, "top_k": None}

# Skinny (rank-r) kernels: memory bound, tiles over M and the wide dimension only.
_SKINNY_CONFIGS = _configs(
    [
        ({"BLOCK_M": 64, "BLOCK_K": 64}, 4, 4),
        ({"BLOCK_M": 64, "BLOCK_K": 128}, 4, 4),
        ({"BLOCK_M": 128, "BLOCK_K": 64}, 4, 4),
        ({"BLOCK_M": 128, "BLOCK_K": 128}, 8, 3),
        ({"BLOCK_M": 64, "BLOCK_K": 256}, 8, 3),
    ],
    interpret={"BLOCK_M": 16, "BLOCK_K": 32},
)
_DY_CONFIGS = _configs(
    [
        ({"BLOCK_M": 64, "BLOCK_N": 64}, 4, 4),
        ({"BLOCK_M": 64, "BLOCK_N": 128}, 4, 4),
        ({"BLOCK_M": 128, "BLOCK_N": 64}, 8, 4),
        ({"BLOCK_M": 128, "BLOCK_N": 128}, 8, 3),
    ],
    interpret={"BLOCK_M": 16, "BLOCK_N": 16},
)


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _keep_mask(seed, rows, cols, n_cols, p):
    """Dropout keep-mask tile (len(rows), len(cols)): Philox stream at offsets row * n_cols + col.

    int32 counters: the launchers check rows * n_cols < 2**31.
    """
    return tl.rand(seed, rows[:, None] * n_cols + cols[None, :]) >= p


# The interpreter multiplies bf16 tiles as their raw 16-bit patterns (numpy has no bf16): there,
# and only there, bf16 dots are done on fp32 copies (exact products, as on tensor cores).
_UPCAST_BF16_DOTS = tl.constexpr(_INTERPRET)


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr):
    """acc += a @ b, with ``a`` cast to ``b``'s dtype (operands of a dot must match)."""
    a = a.to(b.dtype)
    if _UPCAST_BF16_DOTS and b.dtype == tl.bfloat16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _low_rank_update(
    acc,
    lhs_ptr,
    rhs_ptr,  # lhs (M, R), rhs (R, N)
    offs_m,
    offs_n,
    M,
    N,
    R,
    stride_lm,
    stride_lr,
    stride_rr,
    stride_rn,
    scale,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """acc += scale · lhs[offs_m, :] @ rhs[:, offs_n]: the rank-r tail of an extended reduction.

    The scale is applied to the lhs tile in fp32 before the tile is cast for the dot, so the
    same fp32 accumulator carries the dense and the low-rank products.
    """
    mask_m = offs_m < M
    mask_n = offs_n < N
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        lhs = tl.load(
            lhs_ptr + offs_m[:, None].to(tl.int64) * stride_lm + offs_r[None, :] * stride_lr,
            mask=mask_m[:, None] & mask_r[None, :],
            other=0.0,
        )
        rhs = tl.load(
            rhs_ptr + offs_r[:, None] * stride_rr + offs_n[None, :].to(tl.int64) * stride_rn,
            mask=mask_r[:, None] & mask_n[None, :],
            other=0.0,
        )
        acc = _mma(lhs.to(tl.float32) * scale, rhs, acc, DOT_PRECISION)
    return acc


@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, visiting tiles in groups of GROUP_M row-blocks.

    Programs that run together then share the same few rhs column panels in L2 instead of each
    streaming a different one.
    """
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _block_range(n_blocks, axis: tl.constexpr):
    """[start, stop) of the blocks of a loop shared by the programs along grid ``axis``."""
    per_program = tl.cdiv(n_blocks, tl.num_programs(axis))
    start = tl.program_id(axis) * per_program
    return start, tl.minimum(start + per_program, n_blocks)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.autotune(configs=_SKINNY_CONFIGS, key=["M_BUCKET", "K", "R", "HAS_DROPOUT"])
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
            x = tl.where(_keep_mask(seed, offs_m, k0 + offs_k, K, p), x, tl.zeros_like(x))
        a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = _mma(x, a, acc, DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    if HAS_DROPOUT:
        acc = acc * (1.0 / (1.0 - p))
    u_ptrs = u_ptr + offs_m[:, None].to(tl.int64) * R + offs_r[None, :]
    tl.store(u_ptrs, acc.to(u_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


@triton.autotune(
    configs=_GEMM_CONFIGS,
    key=["M_BUCKET", "N", "K", "R", "DORA", "HAS_DROPOUT"],
    prune_configs_by=_GEMM_PRUNE,
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
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
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
            acc_x = _mma(x, w, acc_x, DOT_PRECISION)
            keep = _keep_mask(seed, offs_m, k0 + offs_k, K, p)
            x = tl.where(keep, x, tl.zeros_like(x))
        acc = _mma(x, w, acc, DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_DROPOUT:
        acc = acc * (1.0 / (1.0 - p))  # x̃ Wᵀ
        acc_x -= acc
    # rank-r tail of the reduction: + (s·u) Bᵀ
    acc = _low_rank_update(
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
    configs=_DY_CONFIGS,
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
    n_start, n_stop = _block_range(tl.cdiv(N, BLOCK_N), 1)
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
        acc_u = _mma(g, b, acc_u, DOT_PRECISION)
        part_b = _mma(tl.trans(g), u, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32), DOT_PRECISION)
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
    configs=_GEMM_CONFIGS,
    key=["M_BUCKET", "N", "K", "R", "DORA", "HAS_DROPOUT"],
    prune_configs_by=_GEMM_PRUNE,
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
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    TWO_ACC: tl.constexpr = DORA and HAS_DROPOUT

    # the low-rank part first, grad_u A: it is then masked (LoRA) or waits in its own
    # accumulator for the masked (grad_y ⊙ (c − 1)) W part (DoRA with dropout)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _low_rank_update(
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
        keep = _keep_mask(tl.load(seed_ptr), offs_m, offs_n, N, p)
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
                acc = _mma(dy, w, acc, DOT_PRECISION)
                acc_keep = _mma(dy.to(tl.float32) * (c - 1.0), w, acc_keep, DOT_PRECISION)
            else:
                acc = _mma(dy.to(tl.float32) * c, w, acc, DOT_PRECISION)
        else:
            acc = _mma(dy, w, acc, DOT_PRECISION)
        dy_ptrs += BLOCK_K * stride_dyk
        w_ptrs += BLOCK_K * stride_wk
    if TWO_ACC:
        keep = _keep_mask(tl.load(seed_ptr), offs_m, offs_n, N, p)
        acc += tl.where(keep, acc_keep * (1.0 / (1.0 - p)), 0.0)

    out_ptrs = grad_x_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(out_ptrs, acc.to(grad_x_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.autotune(
    configs=_SKINNY_CONFIGS,
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
    m_start, m_stop = _block_range(tl.cdiv(M, BLOCK_M), 2)
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
            x = tl.where(_keep_mask(seed, offs_m, offs_k, K, p), x, tl.zeros_like(x))
        acc = _mma(gu_t, x, acc, DOT_PRECISION)
    if HAS_DROPOUT:
        acc = acc * (1.0 / (1.0 - p))
    tl.atomic_add(
        grad_a_ptr + offs_r[:, None] * K + offs_k[None, :],
        acc,
        mask=mask_r[:, None] & mask_k[None, :],
    )


@triton.jit
def _dropout_mask_kernel(
    seed_ptr,
    keep_ptr,  # keep: uint8 (rows, cols), contiguous
    n_rows,
    n_cols,
    p,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """keep[i, k] = rand(seed, i * n_cols + k) >= p: the stream the other kernels draw."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep_mask(tl.load(seed_ptr), offs_m, offs_n, n_cols, p)
    tl.store(
        keep_ptr + offs_m[:, None].to(tl.int64) * n_cols + offs_n[None, :],
        keep.to(tl.uint8),
        mask=(offs_m < n_rows)[:, None] & (offs_n < n_cols)[None, :],
    )


# ---------------------------------------------------------------------------------------------
# Host helpers
# ---------------------------------------------------------------------------------------------


def _dot_precision() -> str:
    """IEEE fp32 products, unless torch's fp32 matmul precision was relaxed (then TF32)."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _block_r(rank: int) -> int:
    # tl.dot needs every dimension >= 16: small ranks are padded with masked loads
    return min(max(16, triton.next_power_of_2(rank)), _MAX_BLOCK_R)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """About how many programs keep the device busy (the interpreter: a few, to test splits)."""
    return 2 * _sm_count(device) if device.type == "cuda" else 8


def _splits(n_blocks: int, other_programs: int, target: int) -> int:
    """Programs that share a loop over ``n_blocks`` blocks so that ~``target`` programs run."""
    n_blocks = max(n_blocks, 1)
    per_program = triton.cdiv(n_blocks, max(1, min(n_blocks, target // max(other_programs, 1))))
    return triton.cdiv(n_blocks, per_program)


def _check_dropout(dropout_p: float, seed: Tensor | None, n_rows: int, n_cols: int) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0.0:
        if seed is None or seed.numel() != 1 or seed.dtype != torch.int64:
            raise ValueError("dropout_p > 0 needs seed: an int64 tensor with one element")
        if n_rows * n_cols >= 2**31:
            raise ValueError(f"dropout counters are int32: {n_rows} x {n_cols} is too large")


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor | None,
    weight_norm: Tensor | None,
    scaling: float,
    dropout_p: float,
    seed: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Shared LoRA / DoRA forward (DoRA iff ``magnitude`` is given): returns (y, u, base)."""
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    assert weight.shape[1] == K and lora_A.shape[1] == K and lora_B.shape == (N, R)
    _check_dropout(dropout_p, seed, M, K)
    dora = magnitude is not None
    has_dropout = dropout_p > 0.0
    common = {"DOT_PRECISION": _dot_precision(), "BLOCK_R": _block_r(R)}
    m_bucket = triton.next_power_of_2(M)
    seed_arg = seed if has_dropout else x  # unused pointers get a placeholder tensor

    u = torch.empty((M, R), device=x.device, dtype=x.dtype)
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]), triton.cdiv(R, META["BLOCK_R"]))  # noqa: E731
    _lora_down_kernel[grid](
        x,
        lora_A,
        u,
        seed_arg,
        M,
        K,
        R,
        m_bucket,
        x.stride(0),
        x.stride(1),
        lora_A.stride(0),
        lora_A.stride(1),
        dropout_p,
        HAS_DROPOUT=has_dropout,
        **common,
    )

    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    base = torch.empty((M, N), device=x.device, dtype=x.dtype) if dora else None
    grid = lambda META: (  # noqa: E731
        triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),
    )
    _fused_linear_fwd_kernel[grid](
        x,
        weight,
        u,
        lora_B,
        bias if bias is not None else x,
        magnitude if dora else x,
        weight_norm if dora else x,
        y,
        base if dora else y,
        seed_arg,
        M,
        N,
        K,
        R,
        m_bucket,
        x.stride(0),
        x.stride(1),
        weight.stride(0),
        weight.stride(1),
        u.stride(0),
        u.stride(1),
        lora_B.stride(0),
        lora_B.stride(1),
        scaling,
        dropout_p,
        HAS_BIAS=bias is not None,
        DORA=dora,
        HAS_DROPOUT=dora and has_dropout,
        GROUP_M=_GROUP_M,
        **common,
    )
    return y, u, base


def _backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    u: Tensor,
    magnitude: Tensor | None,
    weight_norm: Tensor | None,
    base: Tensor | None,
    scaling: float,
    dropout_p: float,
    seed: Tensor | None,
    needs_grad_x: bool,
    needs_grad_bias: bool,
) -> tuple[Tensor | None, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Shared LoRA / DoRA backward: (grad_x, grad_A, grad_B, grad_m (DoRA), grad_bias)."""
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    assert grad_y.shape == (M, N) and u.shape == (M, R)  # dropout_p and seed: checked in forward
    dora = magnitude is not None
    has_dropout = dropout_p > 0.0
    common = {"DOT_PRECISION": _dot_precision(), "BLOCK_R": _block_r(R)}
    m_bucket = triton.next_power_of_2(M)
    target = _target_programs(x.device)
    seed_arg = seed if has_dropout else x
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
        n_splits = _splits(triton.cdiv(N, META["BLOCK_N"]), m_blocks * r_blocks, target)
        return (m_blocks, n_splits, r_blocks)

    _lora_bwd_dy_kernel[grid_dy](
        grad_y,
        lora_B,
        u,
        magnitude if dora else x,
        weight_norm if dora else x,
        base if dora else x,
        grad_u,
        grad_b,
        grad_mag,
        grad_bias,
        M,
        N,
        R,
        m_bucket,
        grad_y.stride(0),
        grad_y.stride(1),
        lora_B.stride(0),
        lora_B.stride(1),
        u.stride(0),
        u.stride(1),
        base.stride(0) if dora else 0,
        base.stride(1) if dora else 0,
        scaling,
        DORA=dora,
        HAS_BIAS_GRAD=needs_grad_bias,
        **common,
    )

    # 2) grad_x = [G | grad_u] · [W ; A] (with the dropout mask on the low-rank part)
    grad_x = None
    if needs_grad_x:
        grad_x = torch.empty((M, K), device=x.device, dtype=x.dtype)
        grid = lambda META: (  # noqa: E731
            triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(K, META["BLOCK_N"]),
        )
        _lora_grad_x_kernel[grid](
            grad_y,
            weight,
            grad_u,
            lora_A,
            magnitude if dora else x,
            weight_norm if dora else x,
            grad_x,
            seed_arg,
            M,
            K,
            N,
            R,
            m_bucket,
            grad_y.stride(0),
            grad_y.stride(1),
            weight.stride(0),
            weight.stride(1),
            lora_A.stride(0),
            lora_A.stride(1),
            dropout_p,
            DORA=dora,
            HAS_DROPOUT=has_dropout,
            GROUP_M=_GROUP_M,
            **common,
        )

    # 3) grad_A = grad_uᵀ x̃, reduced over M (split over M when K alone gives too few programs)
    grad_a = torch.zeros((R, K), **f32)

    def grid_a(META):
        k_blocks = triton.cdiv(K, META["BLOCK_K"])
        r_blocks = triton.cdiv(R, META["BLOCK_R"])
        m_splits = _splits(triton.cdiv(M, META["BLOCK_M"]), k_blocks * r_blocks, target)
        return (k_blocks, r_blocks, m_splits)

    _lora_grad_a_kernel[grid_a](
        grad_u,
        x,
        grad_a,
        seed_arg,
        M,
        K,
        R,
        m_bucket,
        x.stride(0),
        x.stride(1),
        dropout_p,
        HAS_DROPOUT=has_dropout,
        **common,
    )
    return (
        grad_x,
        grad_a.to(lora_A.dtype),
        grad_b.to(lora_B.dtype),
        grad_mag.to(magnitude.dtype) if dora else None,
        grad_bias.to(grad_y.dtype) if needs_grad_bias else None,
    )


def lora_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float,
    seed: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """LoRA forward: ``y = x Wᵀ + b + s·u Bᵀ`` with ``u = x̃ Aᵀ``.

    Args:
        x: (M, in). weight: W (out, in), any strides. bias: (out,) or None.
        lora_A: A (r, in). lora_B: B (out, r). scaling: s. dropout_p: p in [0, 1).
        seed: int64 (1,) on x's device when p > 0, else None.

    Returns:
        y (M, out) and u (M, r) (saved for backward), both of x's dtype.
    """
    y, u, _ = _forward(x, weight, bias, lora_A, lora_B, None, None, scaling, dropout_p, seed)
    return y, u


def lora_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    u: Tensor,
    scaling: float,
    dropout_p: float,
    seed: Tensor | None,
    needs_grad_x: bool,
    needs_grad_bias: bool,
) -> tuple[Tensor | None, Tensor, Tensor, Tensor | None]:
    """LoRA backward, with gB = grad_y B (M, r) and keep regenerated from ``seed``:

        grad_x = grad_y W + s·(gB A) ⊙ keep / (1 − p)      (None unless needs_grad_x)
        grad_A = s·gBᵀ x̃,  grad_B = s·grad_yᵀ u,  grad_bias = Σ_M grad_y  (None unless needed)

    Args: grad_y (M, out); u (M, r) from the forward; the others as in ``lora_forward``.
    Returns: (grad_x (M, in), grad_A (r, in), grad_B (out, r), grad_bias (out,)).
    """
    grad_x, grad_a, grad_b, _, grad_bias = _backward(
        grad_y,
        x,
        weight,
        lora_A,
        lora_B,
        u,
        None,
        None,
        None,
        scaling,
        dropout_p,
        seed,
        needs_grad_x,
        needs_grad_bias,
    )
    return grad_x, grad_a, grad_b, grad_bias


def dora_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    weight_norm: Tensor,
    scaling: float,
    dropout_p: float,
    seed: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """DoRA forward with c = m / n (n = ``weight_norm``, a constant here), u = x̃ Aᵀ:

        p = 0:  base = x Wᵀ + s·u Bᵀ,   y = c ⊙ base + b
        p > 0:  base = x̃ Wᵀ + s·u Bᵀ,   y = (x − x̃) Wᵀ + c ⊙ base + b

    Args: magnitude m (out,), weight_norm n (out,); the others as in ``lora_forward``.
    Returns: y (M, out), u (M, r), base (M, out) (saved for grad_m), all of x's dtype.
    """
    y, u, base = _forward(
        x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p, seed
    )
    return y, u, base


def dora_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    weight_norm: Tensor,
    u: Tensor,
    base: Tensor,
    scaling: float,
    dropout_p: float,
    seed: Tensor | None,
    needs_grad_x: bool,
    needs_grad_bias: bool,
) -> tuple[Tensor | None, Tensor, Tensor, Tensor, Tensor | None]:
    """DoRA backward with G = grad_y ⊙ c and gB = G B (M, r):

        p = 0:  grad_x = G W + s·gB A
        p > 0:  grad_x = grad_y W + [(grad_y ⊙ (c − 1)) W + s·gB A] ⊙ keep / (1 − p)
        grad_A = s·gBᵀ x̃,  grad_B = s·Gᵀ u,  grad_m = Σ_M grad_y ⊙ base / n,  grad_bias = Σ_M grad_y

    Args: u (M, r) and base (M, out) from ``dora_forward``; the others as there.
    Returns: (grad_x (M, in) or None, grad_A, grad_B, grad_magnitude (out,), grad_bias or None).
    """
    grad_x, grad_a, grad_b, grad_mag, grad_bias = _backward(
        grad_y,
        x,
        weight,
        lora_A,
        lora_B,
        u,
        magnitude,
        weight_norm,
        base,
        scaling,
        dropout_p,
        seed,
        needs_grad_x,
        needs_grad_bias,
    )
    assert grad_mag is not None
    return grad_x, grad_a, grad_b, grad_mag, grad_bias


def dropout_keep_mask(seed: Tensor, num_rows: int, num_cols: int, dropout_p: float) -> Tensor:
    """The bool (num_rows, num_cols) keep-mask the kernels draw for ``seed`` (rows × in of x)."""
    _check_dropout(dropout_p, seed, num_rows, num_cols)
    keep = torch.empty((num_rows, num_cols), device=seed.device, dtype=torch.bool)
    block_m, block_n = 32, 128
    grid = (triton.cdiv(num_rows, block_m), triton.cdiv(num_cols, block_n))
    _dropout_mask_kernel[grid](
        seed,
        keep.view(torch.uint8),
        num_rows,
        num_cols,
        dropout_p,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
    )
    return keep
