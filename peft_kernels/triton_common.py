"""Reusable Triton pieces: autotune configs, tile helpers, the Philox dropout mask.

Shared by the kernels of ``peft_kernels.triton_linear`` (and any later fused op): the config spaces
(Hopper / Ampere tiles; one small config under the CPU interpreter), the device helpers a GEMM
tile loop needs (operand casts for ``tl.dot``, the rank-r tail of an extended reduction, the
grouped tile order, a split of a loop across programs), the dropout keep-mask drawn from a
Philox seed, and the host helpers that size grids.

Dropout keeps x[i, k] iff ``tl.rand(seed, i * n_cols + k) >= p``: Philox is counter-based, so
any tile of the mask can be regenerated anywhere, and masks are never stored.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from peft_kernels.backends import triton_interpreted

# The interpreter (CPU) runs one small config: autotuning there would take minutes. Read once,
# at import, as triton reads it when the kernels are decorated.
INTERPRET = triton_interpreted()
# Widest rank tile; larger ranks are covered by several tiles (loops or extra programs).
MAX_BLOCK_R = 64
GROUP_M = 8  # row-blocks per group in the L2-friendly tile order of the GEMM kernels


def _configs(space: list[tuple[dict, int, int]], interpret: dict) -> list[triton.Config]:
    """Autotune configs from ``(meta, num_warps, num_stages)`` triples (Hopper / Ampere)."""
    if INTERPRET:
        return [triton.Config(interpret, num_warps=4, num_stages=1)]
    return [triton.Config(meta, num_warps=w, num_stages=s) for meta, w, s in space]


def _mnk(bm: int, bn: int, bk: int) -> dict:
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}


# GEMM-shaped kernels (forward y, grad_x): tensor-core tiles.
GEMM_CONFIGS = _configs(
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
GEMM_PRUNE = {"early_config_prune": _prune_fp32_tiles, "perf_model": None, "top_k": None}

# Skinny (rank-r) kernels: memory bound, tiles over M and the wide dimension only.
SKINNY_CONFIGS = _configs(
    [
        ({"BLOCK_M": 64, "BLOCK_K": 64}, 4, 4),
        ({"BLOCK_M": 64, "BLOCK_K": 128}, 4, 4),
        ({"BLOCK_M": 128, "BLOCK_K": 64}, 4, 4),
        ({"BLOCK_M": 128, "BLOCK_K": 128}, 8, 3),
        ({"BLOCK_M": 64, "BLOCK_K": 256}, 8, 3),
    ],
    interpret={"BLOCK_M": 16, "BLOCK_K": 32},
)
DY_CONFIGS = _configs(
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
def keep_mask(seed, rows, cols, n_cols, p):
    """Dropout keep-mask tile (len(rows), len(cols)): Philox stream at offsets row * n_cols + col.

    int32 counters: the launchers check rows * n_cols < 2**31.
    """
    return tl.rand(seed, rows[:, None] * n_cols + cols[None, :]) >= p


# The interpreter multiplies bf16 tiles as their raw 16-bit patterns (numpy has no bf16): there,
# and only there, bf16 dots are done on fp32 copies (exact products, as on tensor cores).
UPCAST_BF16_DOTS = tl.constexpr(INTERPRET)


@triton.jit
def mma(a, b, acc, DOT_PRECISION: tl.constexpr):
    """acc += a @ b, with ``a`` cast to ``b``'s dtype (operands of a dot must match)."""
    a = a.to(b.dtype)
    if UPCAST_BF16_DOTS and b.dtype == tl.bfloat16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def low_rank_update(
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
        acc = mma(lhs.to(tl.float32) * scale, rhs, acc, DOT_PRECISION)
    return acc


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
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
def block_range(n_blocks, axis: tl.constexpr):
    """[start, stop) of the blocks of a loop shared by the programs along grid ``axis``."""
    per_program = tl.cdiv(n_blocks, tl.num_programs(axis))
    start = tl.program_id(axis) * per_program
    return start, tl.minimum(start + per_program, n_blocks)


@triton.jit
def mma_wide(a, b, acc, DOT_PRECISION: tl.constexpr):
    """acc += a @ b with both operands in float32 when either is (no rounding of the wider)."""
    if a.dtype == tl.float32 or b.dtype == tl.float32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return mma(a, b, acc, DOT_PRECISION)


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
    keep = keep_mask(tl.load(seed_ptr), offs_m, offs_n, n_cols, p)
    tl.store(
        keep_ptr + offs_m[:, None].to(tl.int64) * n_cols + offs_n[None, :],
        keep.to(tl.uint8),
        mask=(offs_m < n_rows)[:, None] & (offs_n < n_cols)[None, :],
    )


# ---------------------------------------------------------------------------------------------
# Host helpers
# ---------------------------------------------------------------------------------------------


def dot_precision() -> str:
    """IEEE fp32 products, unless torch's fp32 matmul precision was relaxed (then TF32)."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def block_r(rank: int) -> int:
    """The rank tile: tl.dot needs every dimension >= 16, so small ranks are padded (masked)."""
    return min(max(16, triton.next_power_of_2(rank)), MAX_BLOCK_R)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def target_programs(device: torch.device) -> int:
    """About how many programs keep the device busy (the interpreter: a few, to test splits)."""
    return 2 * _sm_count(device) if device.type == "cuda" else 8


def splits(n_blocks: int, other_programs: int, target: int) -> int:
    """Programs that share a loop over ``n_blocks`` blocks so that ~``target`` programs run."""
    n_blocks = max(n_blocks, 1)
    per_program = triton.cdiv(n_blocks, max(1, min(n_blocks, target // max(other_programs, 1))))
    return triton.cdiv(n_blocks, per_program)


def check_dropout(dropout_p: float, seed: Tensor | None, n_rows: int, n_cols: int) -> None:
    """A seed when ``dropout_p > 0``, and int32 Philox counters that do not overflow."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0.0:
        if seed is None or seed.numel() != 1 or seed.dtype != torch.int64:
            raise ValueError("dropout_p > 0 needs seed: an int64 tensor with one element")
        if n_rows * n_cols >= 2**31:
            raise ValueError(f"dropout counters are int32: {n_rows} x {n_cols} is too large")


def dropout_keep_mask(seed: Tensor, num_rows: int, num_cols: int, dropout_p: float) -> Tensor:
    """The bool (num_rows, num_cols) keep-mask the kernels draw for ``seed`` (rows × in of x)."""
    check_dropout(dropout_p, seed, num_rows, num_cols)
    keep = torch.empty((num_rows, num_cols), device=seed.device, dtype=torch.bool)
    block_m, block_n = 32, 128
    grid = (triton.cdiv(num_rows, block_m), triton.cdiv(num_cols, block_n))
    _dropout_mask_kernel[grid](
        seed_ptr=seed,
        keep_ptr=keep.view(torch.uint8),
        n_rows=num_rows,
        n_cols=num_cols,
        p=dropout_p,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
    )
    return keep
