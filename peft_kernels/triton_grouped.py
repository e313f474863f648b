"""Triton backend of ``grouped_lora_delta``: segmented SGMV shrink / expand kernels.

Notation as in ``peft_kernels.torch_grouped``: x (N, in), ordered rows ``x_o = x[rows]`` (M),
group k = ordered rows ``[o_{k-1}, o_k)`` with A_k (r, in), B_k (out, r), s_k; the rows past
``o_{K-1}`` form a "tail" that belongs to no group (δ = 0 there).

Three kernels, each used twice:

- ``_shrink_kernel``: ``t[j] = σ_k · Σ_c x[src_j, c] · W_k[:, c]`` (M, r), the rows gathered
  by index inside the kernel (``src_j = rows[j]``; no ``x[rows]`` copy is ever made).
  Forward: t = x_o A_kᵀ (W = A, σ = 1). Backward: g_t = s_k · g B_k (W_k = B_kᵀ read through
  its strides, rows in order, σ = s).
- ``_expand_kernel``: ``out[dst_j] = σ_k · t[j] V_k`` (M or N, n). Forward: δ = s_k · t B_kᵀ
  (V_k = B_kᵀ, ordered rows, the tail written as zeros: no memset of δ). Backward:
  dx[rows[j]] += g_t[j] A_k (V_k = A_k): scattered with ``tl.atomic_add`` into a zeroed fp32
  (N, in) buffer when ``rows`` is given, so a row that appears twice (MoE top-k > 1) gets both
  terms; stored directly (no atomics, no buffer) when it is not. In the mixed-adapter layer
  (``rows`` a permutation): ``mixed_forward`` adds δ into the base output at ``rows[j]``
  (read-modify-write), ``mixed_backward`` scatter-stores ``g_t A_k`` to ``rows[j]`` and lets
  cuBLAS add ``grad_y W`` in place.
- ``_outer_kernel``: ``out_k = σ_k · L_kᵀ X_k`` per group, a reduction over the group's rows.
  dA_k = g_tᵀ x_k (L = g_t, X = x gathered by ``rows``), dB_k = s_k · g_kᵀ t_k (L = t, X = g,
  stored transposed through the strides). One program per (group, column tile, rank tile)
  walks all rows of its group: no atomics, deterministic, and an empty group writes zeros.

Why segmented (each program owns a tile of ONE group's rows, found through a tile→group map)
rather than gathered per row (each row loads its own group's factors): a BLOCK_M-row tile loads
its group's A_k / B_k tile once and reuses it for BLOCK_M rows, in a ``tl.dot`` on tensor cores;
per-row gathering loads the factors once per row (BLOCK_M× the factor traffic, r·in + out·r
elements per row, as much as the row of x itself for r = 16, in = out) and cannot form an MMA
tile of distinct factors. The price is padding: a group of n rows fills ``ceil(n / BLOCK_M)``
tiles, so at most one partly empty tile per group (K extra tiles in all). The map is built on
the device from ``offsets`` with a few small torch ops (``searchsorted`` over the cumulative
tile counts), sized by the upper bound ``ceil(M / BLOCK_M) + K + 1`` tiles, so no host sync;
programs past the last tile do nothing.

Costs, against a loop of K per-adapter LoRA branches: the same FLOPs (2·M·r·(in + out) forward)
and one pass over x_o and one over δ for all groups together, with 2 + (map) launches instead of
2K GEMM launches and K gathers; the shrink reads x once (gathered), never a copy of it.

Dtypes: tiles are multiplied in ``promote(x, A)`` (``mma_wide``: fp32 factors on a bf16 x run
in fp32) with fp32 accumulators; t is stored in that dtype, δ and dx in x's, dA and dB in the
factors'. The dx atomics make the summation order of repeated rows (last bits) vary run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from peft_kernels.torch_grouped import group_all
from peft_kernels.triton_common import INTERPRET, MAX_BLOCK_R, _configs, dot_precision, mma_wide

__all__ = ["backward", "forward", "mixed_backward", "mixed_forward"]

# How ``_expand_kernel`` writes its output: the launchers pass these ints as ``MODE``, the kernel
# compares it with the constexpr globals.
_MODES = {"store": 0, "atomic": 1, "scatter": 2, "add": 3}
STORE, ATOMIC, SCATTER, ADD = (tl.constexpr(v) for v in _MODES.values())


def _meta(**blocks: int) -> dict:
    return blocks


# The row tile is fixed by the host (the tile map depends on it); the rest is autotuned.
_SHRINK_CONFIGS = _configs(
    [
        (_meta(BLOCK_K=64), 4, 4),
        (_meta(BLOCK_K=128), 4, 4),
        (_meta(BLOCK_K=256), 8, 3),
    ],
    interpret=_meta(BLOCK_K=32),
)
_EXPAND_CONFIGS = _configs(
    [
        (_meta(BLOCK_N=64), 4, 4),
        (_meta(BLOCK_N=128), 4, 4),
        (_meta(BLOCK_N=256), 8, 3),
    ],
    interpret=_meta(BLOCK_N=16),
)
_OUTER_CONFIGS = _configs(
    [
        (_meta(BLOCK_M=64, BLOCK_N=64), 4, 4),
        (_meta(BLOCK_M=64, BLOCK_N=128), 4, 4),
        (_meta(BLOCK_M=128, BLOCK_N=128), 8, 3),
    ],
    interpret=_meta(BLOCK_M=16, BLOCK_N=16),
)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.autotune(configs=_SHRINK_CONFIGS, key=["C", "R", "HAS_ROWS"])
@triton.jit
def _shrink_kernel(
    # pointers
    x_ptr,  # (N, C) activations: x, or grad δ (M, out)
    rows_ptr,  # (M,) int64 source row of each ordered row (HAS_ROWS)
    w_ptr,  # (K, R, C) through strides: A, or Bᵀ
    scale_ptr,  # (K,) σ_k (HAS_SCALE)
    t_ptr,  # (M, R) output
    tile_group_ptr,  # (T,) int32 group of each tile: K = the tail, K + 1 = no tile
    tile_start_ptr,  # (T,) int32 first ordered row of each tile
    tile_end_ptr,  # (T,) int32 end of the tile's group
    # sizes
    K,
    C,
    R,
    # strides
    stride_xm,
    stride_xc,
    stride_wk,
    stride_wr,
    stride_wc,
    stride_tm,
    stride_tr,
    # meta
    HAS_ROWS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """t[j, r] = σ_k · Σ_c x[src_j, c] · w[k, r, c] for the ordered rows j of one tile."""
    tile = tl.program_id(0)
    group = tl.load(tile_group_ptr + tile)
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(tile_end_ptr + tile)
    offs_m = start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    t_ptrs = t_ptr + offs_m[:, None].to(tl.int64) * stride_tm + offs_r[None, :] * stride_tr
    if group < K:
        if HAS_ROWS:
            src = tl.load(rows_ptr + offs_m, mask=mask_m, other=0)
        else:
            src = offs_m
        x_rows = x_ptr + src[:, None].to(tl.int64) * stride_xm
        w_base = w_ptr + group.to(tl.int64) * stride_wk + offs_r[None, :] * stride_wr
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_K):
            offs_c = c0 + tl.arange(0, BLOCK_K)
            mask_c = offs_c < C
            x = tl.load(
                x_rows + offs_c[None, :] * stride_xc,
                mask=mask_m[:, None] & mask_c[None, :],
                other=0.0,
            )
            w = tl.load(
                w_base + offs_c[:, None] * stride_wc,
                mask=mask_c[:, None] & mask_r[None, :],
                other=0.0,
            )  # (BLOCK_K, BLOCK_R): the factor tile, loaded once for BLOCK_M rows
            acc = mma_wide(x, w, acc, DOT_PRECISION)
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr + group).to(tl.float32)
        tl.store(t_ptrs, acc.to(t_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])
    elif group == K:  # the tail, rows of no group: t = 0
        zeros = tl.zeros((BLOCK_M, BLOCK_R), dtype=t_ptr.dtype.element_ty)
        tl.store(t_ptrs, zeros, mask=mask_m[:, None] & mask_r[None, :])


# restore_value: autotuning runs the kernel once per config; ``out`` is put back each time (the
# atomic buffer to zeros, the base output of an ADD to itself)
@triton.autotune(configs=_EXPAND_CONFIGS, key=["N", "R", "MODE"], restore_value=["out_ptr"])
@triton.jit
def _expand_kernel(
    # pointers
    t_ptr,  # (M, R) ordered
    v_ptr,  # (K, R, N) through strides: Bᵀ, or A
    scale_ptr,  # (K,) σ_k (HAS_SCALE)
    out_ptr,  # (M, N) ordered (STORE), or (rows' range, N): fp32 (ATOMIC), any (SCATTER, ADD)
    rows_ptr,  # (M,) int64 destination row of each ordered row (ATOMIC, SCATTER, ADD)
    bias_ptr,  # (N,) added to every row written (SCATTER with HAS_BIAS)
    tile_group_ptr,
    tile_start_ptr,
    tile_end_ptr,
    # sizes
    K,
    N,
    R,
    # strides
    stride_tm,
    stride_tr,
    stride_vk,
    stride_vr,
    stride_vn,
    stride_om,
    stride_on,
    # meta
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    MODE: tl.constexpr,  # STORE, ATOMIC, SCATTER or ADD
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """``out[dst_j, n] (+)= σ_k · Σ_r t[j, r] · v[k, r, n]``. STORE: ``=`` at j (the tail gets
    zeros); ATOMIC: ``+=`` at ``rows[j]`` with fp32 atomics (rows may repeat); SCATTER: ``=`` at
    ``rows[j]`` (+ bias), the tail rows get the bias or zeros (``rows`` a permutation: every
    row of ``out`` is written once); ADD: ``+=`` at ``rows[j]`` by a plain read-modify-write
    in fp32, one rounding (rows must not repeat)."""
    tile = tl.program_id(0)
    group = tl.load(tile_group_ptr + tile)
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(tile_end_ptr + tile)
    offs_m = start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    if MODE != STORE:
        dst = tl.load(rows_ptr + offs_m, mask=mask_m, other=0)
    else:
        dst = offs_m
    out_ptrs = out_ptr + dst[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    if group < K:
        v_base = v_ptr + group.to(tl.int64) * stride_vk + offs_n[None, :] * stride_vn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            t = tl.load(
                t_ptr + offs_m[:, None].to(tl.int64) * stride_tm + offs_r[None, :] * stride_tr,
                mask=mask_m[:, None] & mask_r[None, :],
                other=0.0,
            )
            v = tl.load(
                v_base + offs_r[:, None] * stride_vr,
                mask=mask_r[:, None] & mask_n[None, :],
                other=0.0,
            )
            acc = mma_wide(t, v, acc, DOT_PRECISION)
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr + group).to(tl.float32)
        if MODE == ATOMIC:
            tl.atomic_add(out_ptrs, acc, mask=mask)
        else:
            if MODE == ADD:
                acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    elif group == K:  # the tail: δ = 0 (an atomic scatter or an ADD adds nothing)
        if MODE == STORE or MODE == SCATTER:
            tail = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if HAS_BIAS:
                tail += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptrs, tail.to(out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_OUTER_CONFIGS, key=["N", "R", "HAS_ROWS"])
@triton.jit
def _outer_kernel(
    # pointers
    l_ptr,  # (M, R) ordered: g_t, or t
    x_ptr,  # (N_x, N): x (gathered by rows), or grad δ (ordered)
    rows_ptr,  # (M,) int64 (HAS_ROWS)
    offsets_ptr,  # (K,) cumulative ends of the groups
    scale_ptr,  # (K,) σ_k (HAS_SCALE)
    out_ptr,  # (K, R, N) through strides: dA, or dBᵀ
    # sizes
    N,
    R,
    # strides
    stride_lm,
    stride_lr,
    stride_xm,
    stride_xn,
    stride_ok,
    stride_or,
    stride_on,
    # meta
    HAS_ROWS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """out[k, r, n] = σ_k · Σ_{j in group k} l[j, r] · x[src_j, n]; one program walks a group."""
    group = tl.program_id(0)
    end = tl.load(offsets_ptr + group).to(tl.int64)
    start = tl.load(offsets_ptr + group - 1, mask=group > 0, other=0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < end
        if HAS_ROWS:
            src = tl.load(rows_ptr + offs_m, mask=mask_m, other=0)
        else:
            src = offs_m
        lhs = tl.load(
            l_ptr + offs_m[None, :] * stride_lm + offs_r[:, None] * stride_lr,
            mask=mask_r[:, None] & mask_m[None, :],
            other=0.0,
        )  # (BLOCK_R, BLOCK_M): lᵀ
        x = tl.load(
            x_ptr + src[:, None].to(tl.int64) * stride_xm + offs_n[None, :] * stride_xn,
            mask=mask_m[:, None] & mask_n[None, :],
            other=0.0,
        )
        acc = mma_wide(lhs, x, acc, DOT_PRECISION)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + group).to(tl.float32)
    out_ptrs = (
        out_ptr
        + group.to(tl.int64) * stride_ok
        + offs_r[:, None] * stride_or
        + offs_n[None, :] * stride_on
    )
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_n[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _block_m(n_ordered: int) -> int:
    """The row tile of the segmented kernels (the tile map is built for it)."""
    if INTERPRET or n_ordered <= 512:
        return 16
    return 64


def _block_r(rank: int) -> int:
    """tl.dot needs every dimension >= 16: small ranks are padded (masked)."""
    return min(max(16, triton.next_power_of_2(rank)), MAX_BLOCK_R)


def tile_map(offsets: Tensor, n_ordered: int, block_m: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(group, start, end)`` int32 per tile, T = ceil(M / BLOCK_M) + K + 1 tiles (an upper
    bound: each group adds at most one partial tile): tile i covers ordered rows
    ``[start, min(start + BLOCK_M, end))`` of group ``group`` (K: the tail of no group; K + 1:
    no rows). Built on the device, without a host sync.
    """
    n_groups = offsets.shape[0]
    device = offsets.device
    tail = torch.full((1,), n_ordered, dtype=torch.int64, device=device)
    ends = torch.cat([offsets.to(torch.int64), tail])  # K + 1 groups, the tail last
    starts = torch.cat([tail.new_zeros(1), ends[:-1]])
    tiles = (ends - starts + block_m - 1) // block_m
    cumulative = tiles.cumsum(0)
    n_tiles = triton.cdiv(n_ordered, block_m) + n_groups + 1
    ids = torch.arange(n_tiles, device=device, dtype=torch.int64)
    group = torch.searchsorted(cumulative, ids, right=True)  # K + 1 past the last tile
    clamped = group.clamp(max=n_groups)
    start = starts[clamped] + (ids - (cumulative[clamped] - tiles[clamped])) * block_m
    end = torch.where(group > n_groups, start, ends[clamped])
    return group.to(torch.int32), start.to(torch.int32), end.to(torch.int32)


def _shrink(x, rows, w, w_strides, scale, t, maps, block_m) -> None:
    """t = σ · x[rows] wᵀ per group; w (K, R, C) given by ``w_strides``."""
    n_groups, rank, width = w.shape[0], t.shape[1], x.shape[1]
    block_r = _block_r(rank)
    _shrink_kernel[(maps[0].shape[0], triton.cdiv(rank, block_r))](
        x, x if rows is None else rows, w, x if scale is None else scale, t, *maps,
        n_groups, width, rank,
        x.stride(0), x.stride(1), *w_strides, t.stride(0), t.stride(1),
        HAS_ROWS=rows is not None, HAS_SCALE=scale is not None, BLOCK_M=block_m,
        BLOCK_R=block_r, DOT_PRECISION=dot_precision(),
    )  # fmt: skip


def _expand(t, v, v_strides, scale, out, rows, maps, block_m, mode=None, bias=None) -> None:
    """out[rows or j] (+)= σ · t v per group; v (K, R, N) given by ``v_strides``; ``mode``:
    "store" when ``rows`` is None, else "atomic" unless given ("scatter" + ``bias``, "add")."""
    if mode is None:
        mode = "store" if rows is None else "atomic"
    n_groups, rank, width = v.shape[0], t.shape[1], out.shape[1]

    def grid(meta):
        return maps[0].shape[0], triton.cdiv(width, meta["BLOCK_N"])

    _expand_kernel[grid](
        t, v, t if scale is None else scale, out, t if rows is None else rows,
        t if bias is None else bias, *maps,
        n_groups, width, rank,
        t.stride(0), t.stride(1), *v_strides, out.stride(0), out.stride(1),
        HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, MODE=_MODES[mode],
        BLOCK_M=block_m,
        BLOCK_R=_block_r(rank), DOT_PRECISION=dot_precision(),
    )  # fmt: skip


def _outer(lhs, x, rows, offsets, scale, out, out_strides) -> None:
    """out_k = σ_k · lhs_kᵀ x[rows]_k per group; out (K, R, N) given by ``out_strides``."""
    n_groups, rank, width = offsets.shape[0], lhs.shape[1], x.shape[1]
    block_r = _block_r(rank)

    def grid(meta):
        return n_groups, triton.cdiv(width, meta["BLOCK_N"]), triton.cdiv(rank, block_r)

    _outer_kernel[grid](
        lhs, x, lhs if rows is None else rows, offsets, lhs if scale is None else scale, out,
        width, rank,
        lhs.stride(0), lhs.stride(1), x.stride(0), x.stride(1), *out_strides,
        HAS_ROWS=rows is not None, HAS_SCALE=scale is not None, BLOCK_R=block_r,
        DOT_PRECISION=dot_precision(),
    )  # fmt: skip


def forward(
    x: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: Tensor,
    offsets: Tensor,
    rows: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """``(δ (M, out) in x's dtype, t (M, r) in promote(x, A))``: shrink then expand."""
    n_ordered = x.shape[0] if rows is None else rows.shape[0]
    rank, out_features = lora_A.shape[1], lora_B.shape[1]
    wide = torch.promote_types(x.dtype, lora_A.dtype)
    t = x.new_empty(n_ordered, rank, dtype=wide)
    delta = x.new_empty(n_ordered, out_features)
    if n_ordered == 0:
        return delta, t
    block_m = _block_m(n_ordered)
    maps = tile_map(offsets, n_ordered, block_m)
    a_strides = lora_A.stride()  # A_k[r, c]
    _shrink(x, rows, lora_A, a_strides, None, t, maps, block_m)
    b_strides = (lora_B.stride(0), lora_B.stride(2), lora_B.stride(1))  # B_kᵀ[r, n]
    _expand(t, lora_B, b_strides, scaling, delta, None, maps, block_m)
    return delta, t


def backward(
    grad: Tensor,
    x: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: Tensor,
    offsets: Tensor,
    rows: Tensor | None,
    t: Tensor,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx (N, in), dA (K, r, in), dB (K, out, r))``, None where not needed:
    g_t = s·g B_k (shrink), dx = g_t A_k (expand, scattered), dA = g_tᵀ x_k, dB = s·gᵀ t (outer).
    """
    needs_x, needs_a, needs_b = needs
    n_ordered, rank = t.shape
    grad_x = grad_a = grad_b = None
    if needs_b:
        grad_b = torch.empty_like(lora_B)
        if n_ordered:  # dB_kᵀ[r, n] = s_k Σ_j t[j, r] g[j, n]
            b_strides = (grad_b.stride(0), grad_b.stride(2), grad_b.stride(1))
            _outer(t, grad, None, offsets, scaling, grad_b, b_strides)
        else:
            grad_b.zero_()
    if needs_x or needs_a:
        block_m = _block_m(n_ordered)
        maps = tile_map(offsets, n_ordered, block_m) if n_ordered else None
        grad_t = t.new_empty(n_ordered, rank)
        if n_ordered:  # g_t = s_k g B_k: B_k[n, r] is the (R, C) = (r, out) operand transposed
            b_strides = (lora_B.stride(0), lora_B.stride(2), lora_B.stride(1))
            _shrink(grad, None, lora_B, b_strides, scaling, grad_t, maps, block_m)
        if needs_a:
            grad_a = torch.empty_like(lora_A)
            if n_ordered:
                _outer(grad_t, x, rows, offsets, None, grad_a, grad_a.stride())
            else:
                grad_a.zero_()
        if needs_x:
            grad_x = _grad_x(grad_t, x, lora_A, rows, maps, block_m)
    return grad_x, grad_a, grad_b


def _grad_x(grad_t: Tensor, x: Tensor, lora_A: Tensor, rows, maps, block_m: int) -> Tensor:
    """dx = g_t A_k per group: stored in order (``rows`` None), else scattered with fp32 atomics
    into a zeroed buffer (a repeated row accumulates its terms), cast to x's dtype once."""
    if rows is None:
        grad_x = torch.empty_like(x)
        if x.shape[0]:
            _expand(grad_t, lora_A, lora_A.stride(), None, grad_x, None, maps, block_m)
        return grad_x
    buffer = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
    if grad_t.shape[0]:
        _expand(grad_t, lora_A, lora_A.stride(), None, buffer, rows, maps, block_m)
    return buffer if x.dtype == torch.float32 else buffer.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# The mixed-adapter layer: the base GEMM first, the expand adds into its output in place
# ---------------------------------------------------------------------------------------------


def mixed_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: Tensor,
    adapter_index: Tensor | None,
    offsets: Tensor | None,
    rows: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """``(y (N, out), t (N, r), rows (N,) or None, offsets (K,))``, grouped from
    ``adapter_index``, or (None) by the given ``offsets`` and ``rows`` (a permutation; None: in
    order, read through ``arange``).

    ``y = x Wᵀ + b`` (cuBLAS) is launched first: the eager value check of the adapter ids
    (``grouped.mixed_lora_linear``) has just synchronised, and the GEMM keeps the GPU busy while
    the CPU launches the small grouping ops (``group_all``, ``tile_map``). Then the shrink, and
    the expand adds ``s_k · t B_kᵀ`` into y's rows ``rows[j]`` in place ("add": read-modify-
    write in fp32, one rounding; ``rows`` is a permutation, no two programs touch one row).
    No (N, out) δ is written, read back and scattered.
    """
    y = torch.nn.functional.linear(x, weight, bias)
    if adapter_index is not None:
        rows, offsets = group_all(adapter_index, lora_A.shape[0])
    # rows None (in order): the kernels read through arange; None is returned (as the fake's)
    ordered = torch.arange(x.shape[0], device=x.device) if rows is None else rows
    n_rows, rank = ordered.shape[0], lora_A.shape[1]
    t = x.new_empty(n_rows, rank, dtype=torch.promote_types(x.dtype, lora_A.dtype))
    if n_rows:
        block_m = _block_m(n_rows)
        maps = tile_map(offsets, n_rows, block_m)
        _shrink(x, ordered, lora_A, lora_A.stride(), None, t, maps, block_m)
        b_strides = (lora_B.stride(0), lora_B.stride(2), lora_B.stride(1))
        _expand(t, lora_B, b_strides, scaling, y, ordered, maps, block_m, "add")
    return y, t, rows, offsets


def mixed_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: Tensor,
    offsets: Tensor,
    rows: Tensor | None,
    t: Tensor,
    needs: tuple[bool, bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dbias, dA, dB)``, None where not needed (``needs`` in that order). The gradient
    of the ordered rows is ``grad_y[rows]``, read through ``rows`` by the kernels (never copied):
    dB = s·outer(t, grad_y[rows]), g_t = s·grad_y[rows] B_k, dA = outer(g_t, x[rows]),
    dx = g_t A_k scattered to ``rows`` (zeros for rows of no adapter), then ``+= grad_y W``
    (cuBLAS, in place).
    """
    needs_x, needs_bias, needs_a, needs_b = needs
    rows = torch.arange(x.shape[0], device=x.device) if rows is None else rows
    n_rows = rows.shape[0]
    grad_x = grad_bias = grad_a = grad_b = None
    if needs_bias:
        grad_bias = grad_y.sum(0)
    if needs_b:
        grad_b = torch.zeros_like(lora_B)
        if n_rows:
            b_strides = (grad_b.stride(0), grad_b.stride(2), grad_b.stride(1))
            _outer(t, grad_y, rows, offsets, scaling, grad_b, b_strides)
    if needs_x:
        grad_x = torch.empty_like(x)
    if needs_x or needs_a:
        grad_a = torch.zeros_like(lora_A) if needs_a else None
        if n_rows:
            block_m = _block_m(n_rows)
            maps = tile_map(offsets, n_rows, block_m)
            grad_t = t.new_empty(n_rows, t.shape[1])
            b_strides = (lora_B.stride(0), lora_B.stride(2), lora_B.stride(1))
            _shrink(grad_y, rows, lora_B, b_strides, scaling, grad_t, maps, block_m)
            if needs_a:
                _outer(grad_t, x, rows, offsets, None, grad_a, grad_a.stride())
            if needs_x:
                a_strides = lora_A.stride()
                _expand(grad_t, lora_A, a_strides, None, grad_x, rows, maps, block_m, "scatter")
    if needs_x:
        grad_x.addmm_(grad_y, weight)
    return grad_x, grad_bias, grad_a, grad_b
