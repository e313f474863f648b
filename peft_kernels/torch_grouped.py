"""PyTorch backend of ``grouped_lora_delta``: a loop over the non-empty groups (the CPU path).

Notation: x (N, in); the ordered rows ``x_o = x[rows]`` (M, in) (x itself when ``rows`` is
None); group k is ordered rows ``[o_{k-1}, o_k)`` (``o`` = ``offsets``, cumulative ends,
``o_{-1} = 0``) with factors A_k (r, in), B_k (out, r) and scaling s_k.

Forward, per group (one GEMM pair on slices; the offsets and scalings go to the host once;
groups all of one size run as one batched pair, ``uniform_size``):
    t_k = x_k A_kᵀ   (n_k, r)          δ_k = s_k · t_k B_kᵀ   (n_k, out)
Rows ``j >= o_{K-1}`` get δ = 0 (and t = 0).

Backward, with g = grad δ (M, out):
    g_t = s_k · g_k B_k   (n_k, r)
    dx[rows_k] += g_t A_k          (index_add: a row that appears twice gets both terms)
    dA_k = g_tᵀ x_k                dB_k = s_k · g_kᵀ t_k

Saved for backward: x itself (never the gathered copy ``x[rows]``, which is 2× x for MoE
top-2 routing: each group's rows are gathered again in backward, one pass over M×in), ``rows``,
``offsets``, the factors and t (M, r), so the shrink GEMM is not redone.

Dtypes: the math runs in ``wide = promote(x.dtype, A.dtype)`` (float32 factors on a bfloat16
x run in float32, as ``lora_linear`` runs its adapter branch); δ and dx are cast to x's dtype,
dA and dB are in the factors' dtype, t is kept in ``wide``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(x: Tensor, lora_A: Tensor) -> torch.dtype:
    """The dtype the adapter math runs in: ``promote(x.dtype, A.dtype)``."""
    return torch.promote_types(x.dtype, lora_A.dtype)


def segments(offsets: Tensor) -> list[tuple[int, int, int]]:
    """``(k, start, end)`` of the non-empty groups, from the offsets (one host transfer)."""
    ends = offsets.tolist()
    starts = [0, *ends[:-1]]
    return [(k, a, b) for k, (a, b) in enumerate(zip(starts, ends, strict=True)) if b > a]


def uniform_size(groups: list[tuple[int, int, int]], n_groups: int) -> int | None:
    """The common size n of the groups when all ``n_groups`` are non-empty and of one size
    (ordered rows ``[0, K·n)``: a batch spread evenly over its adapters), else None. Those run as
    one batched GEMM pair (``torch.bmm`` over (K, n, ·) views) instead of a loop of 2K GEMMs."""
    if not groups or len(groups) != n_groups:
        return None
    size = groups[0][2] - groups[0][1]
    return size if all(end - start == size for _, start, end in groups) else None


def _ordered(x: Tensor, rows: Tensor | None, start: int, end: int, dtype: torch.dtype) -> Tensor:
    """Ordered rows ``[start, end)`` of x (gathered through ``rows``) in ``dtype``."""
    part = x[start:end] if rows is None else x.index_select(0, rows[start:end])
    return part.to(dtype)


def forward(
    x: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: Tensor,
    offsets: Tensor,
    rows: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """``(δ (M, out) in x's dtype, t (M, r) in the compute dtype)``."""
    wide = compute_dtype(x, lora_A)
    n_ordered = x.shape[0] if rows is None else rows.shape[0]
    delta = x.new_empty(n_ordered, lora_B.shape[1])
    t = x.new_empty(n_ordered, lora_A.shape[1], dtype=wide)
    groups = segments(offsets)
    size = uniform_size(groups, lora_A.shape[0])
    if size is not None:
        end = _uniform_forward(x, lora_A, lora_B, scaling, rows, size, delta, t)
        groups = []
    else:
        end = 0
    scales = scaling.tolist()
    for k, start, end in groups:
        t_k = torch.mm(_ordered(x, rows, start, end, wide), lora_A[k].to(wide).T, out=t[start:end])
        # s_k on the small t_k (n_k, r); the expand GEMM writes into δ when δ has the compute
        # dtype (no (n_k, out) temporary and copy)
        scaled = t_k * scales[k]
        if delta.dtype == wide:
            torch.mm(scaled, lora_B[k].T, out=delta[start:end])
        else:
            delta[start:end] = torch.mm(scaled, lora_B[k].to(wide).T)
    delta[end:] = 0
    t[end:] = 0
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
    """``(dx (N, in), dA (K, r, in), dB (K, out, r))``; None where ``needs`` says not needed."""
    needs_x, needs_a, needs_b = needs
    wide = t.dtype
    groups = segments(offsets)
    size = uniform_size(groups, lora_A.shape[0])
    if size is not None:
        return _uniform_backward(grad, x, lora_A, lora_B, scaling, rows, t, size, needs)
    grad_x = torch.zeros_like(x) if needs_x else None
    grad_a = torch.zeros_like(lora_A) if needs_a else None
    grad_b = torch.zeros_like(lora_B) if needs_b else None
    scales = scaling.tolist()
    for k, start, end in groups:
        g_k = grad[start:end].to(wide)
        if needs_b:
            grad_b[k] = torch.mm(t[start:end].T, g_k).mul_(scales[k]).T  # (tᵀ g)ᵀ: the fast layout
        if not (needs_x or needs_a):
            continue
        g_t = torch.mm(g_k, lora_B[k].to(wide)).mul_(scales[k])  # (n_k, r)
        if needs_a:
            grad_a[k] = torch.mm(g_t.T, _ordered(x, rows, start, end, wide))
        if needs_x:
            g_x = torch.mm(g_t, lora_A[k].to(wide)).to(x.dtype)
            if rows is None:
                grad_x[start:end] = g_x
            else:
                grad_x.index_add_(0, rows[start:end], g_x)
    return grad_x, grad_a, grad_b


def _uniform_forward(
    x: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: Tensor,
    rows: Tensor | None,
    size: int,
    delta: Tensor,
    t: Tensor,
) -> int:
    """``forward`` for K groups of ``size`` rows each (``uniform_size``), batched over the
    groups, into ``delta`` and ``t``; returns the end of the grouped rows, K·size."""
    wide, n_groups = t.dtype, lora_A.shape[0]
    end = n_groups * size
    ordered = _ordered(x, rows, 0, end, wide).view(n_groups, size, -1)
    t_u = t[:end].view(n_groups, size, -1)
    torch.bmm(ordered, lora_A.to(wide).transpose(1, 2), out=t_u)
    scaled = t_u * scaling.to(wide).view(-1, 1, 1)
    expand = lora_B.to(wide).transpose(1, 2)
    if delta.dtype == wide:
        torch.bmm(scaled, expand, out=delta[:end].view(n_groups, size, -1))
    else:
        delta[:end] = torch.bmm(scaled, expand).view(end, -1)
    return end


def _uniform_backward(
    grad: Tensor,
    x: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: Tensor,
    rows: Tensor | None,
    t: Tensor,
    size: int,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``backward`` for K groups of ``size`` rows each (``uniform_size``), batched over the
    groups. dA and dB come straight from the batched GEMMs (every group is there: nothing to
    zero); dx too when x's rows are the ordered rows, all of them."""
    needs_x, needs_a, needs_b = needs
    wide, n_groups = t.dtype, lora_A.shape[0]
    end = n_groups * size
    g = grad[:end].to(wide).view(n_groups, size, -1)  # (K, n, out)
    scale = scaling.to(wide).view(-1, 1, 1)
    grad_x = grad_a = grad_b = None
    if needs_b:  # (tᵀ g)ᵀ: reading g transposed is the slow layout
        t_u = t[:end].view(n_groups, size, -1)
        grad_b = torch.bmm(t_u.transpose(1, 2), g).mul_(scale).mT.to(lora_B.dtype)
        grad_b = grad_b.contiguous()
    if not (needs_x or needs_a):
        return grad_x, grad_a, grad_b
    g_t = torch.bmm(g, lora_B.to(wide)).mul_(scale)  # (K, n, r)
    if needs_a:
        ordered = _ordered(x, rows, 0, end, wide).view(n_groups, size, -1)
        grad_a = torch.bmm(g_t.transpose(1, 2), ordered).to(lora_A.dtype)
    if needs_x:
        g_x = torch.bmm(g_t, lora_A.to(wide)).view(end, -1).to(x.dtype)
        if rows is None and end == x.shape[0]:
            grad_x = g_x
        else:
            grad_x = torch.zeros_like(x)
            if rows is None:
                grad_x[:end] = g_x
            else:
                grad_x.index_add_(0, rows[:end], g_x)
    return grad_x, grad_a, grad_b
