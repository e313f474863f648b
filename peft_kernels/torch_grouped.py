"""PyTorch backend of ``grouped_lora_delta`` (the CPU path): one grouped GEMM per product
(``torch._grouped_mm``) where it runs, else a loop over the non-empty groups.

Notation: x (N, in); the ordered rows ``x_o = x[rows]`` (M, in) (x itself when ``rows`` is
None); group k is ordered rows ``[o_{k-1}, o_k)`` (``o`` = ``offsets``, cumulative ends,
``o_{-1} = 0``) with factors A_k (r, in), B_k (out, r) and scaling s_k.

Paths, in order: groups all of one size (a batch spread evenly over its adapters,
``uniform_size``) run as one batched pair (``torch.bmm``); otherwise, where ``torch._grouped_mm``
runs on the device and dtype and in, r, out are multiples of 16 bytes (its stride rule), every
product is one grouped GEMM over all ordered rows (no Python per group: the MoE case, uneven
groups; measured on CPU, fp32, E=16, r=16, hidden 512: the expert layer's adapter overhead per
forward + backward 17.0 -> 16.2 ms); else a loop of GEMM pairs on slices (the offsets and
scalings go to the host once). The math per group:
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
dA and dB are in the factors' dtype, t is kept in ``wide``. dB has B's strides (B may be a
strided view, e.g. B_e = B[:, e::E] of peft's layout: its gradient then lands in that layout).
"""

from __future__ import annotations

import functools

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


def group_all(group_index: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """``(rows (N,), offsets (num_groups,))``: every row, sorted by group (stable), the rows of
    no group (-1) last, past ``offsets[-1]``. No data-dependent size (``torch.compile``)."""
    key = torch.where(group_index < 0, num_groups, group_index).to(torch.int64)
    rows = torch.sort(key, stable=True).indices
    counts = torch.zeros(num_groups + 1, dtype=torch.int64, device=key.device)
    counts.index_add_(0, key, torch.ones_like(key))
    return rows, counts[:num_groups].cumsum(0)


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
    groups = segments(offsets)
    size = uniform_size(groups, lora_A.shape[0])
    if size is None and _use_grouped_mm(x, lora_A, lora_B, wide, n_ordered):
        return _grouped_mm_forward(x, lora_A, lora_B, scaling, offsets, rows, wide)
    lora_B = lora_B.contiguous()  # per-group slices B_k: strided reads cost more than a copy
    delta = x.new_empty(n_ordered, lora_B.shape[1])
    t = x.new_empty(n_ordered, lora_A.shape[1], dtype=wide)
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
            torch.mm(scaled, lora_B[k].to(wide).T, out=delta[start:end])
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
    if size is None and _use_grouped_mm(x, lora_A, lora_B, wide, t.shape[0]):
        return _grouped_mm_backward(grad, x, lora_A, lora_B, scaling, offsets, rows, t, needs)
    if size is not None:
        grad_x, grad_a, grad_b = _uniform_backward(
            grad, x, lora_A, lora_B.contiguous(), scaling, rows, t, size, needs
        )
        if grad_b is not None and grad_b.stride() != lora_B.stride():
            grad_b = torch.empty_like(lora_B).copy_(grad_b)  # B's strides (as the fake's)
        return grad_x, grad_a, grad_b
    grad_x = torch.zeros_like(x) if needs_x else None
    grad_a = torch.zeros_like(lora_A) if needs_a else None
    grad_b = torch.zeros_like(lora_B) if needs_b else None  # B's strides (as the fake's)
    lora_B = lora_B.contiguous()
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
    """``(y (N, out), t (N, r), rows (N,) or None, offsets (K,))``: ``y = x Wᵀ + b``, then δ of
    the rows grouped by adapter (``group_all`` of ``adapter_index``, else the given ``offsets``
    and ``rows``, a permutation or None: in order) added at their places, in place: rows in
    order and groups of one size accumulate straight into y (``baddbmm_``, no (N, out) δ),
    others through ``index_add_``."""
    y = torch.nn.functional.linear(x, weight, bias)
    if adapter_index is not None:
        rows, offsets = group_all(adapter_index, lora_A.shape[0])
    if rows is None and y.dtype == compute_dtype(x, lora_A):  # else forward finds the groups
        size = uniform_size(segments(offsets), lora_A.shape[0])
        if size is not None:
            t = _uniform_add(x, lora_A, lora_B, scaling, size, y)
            return y, t, rows, offsets
    delta, t = forward(x, lora_A, lora_B, scaling, offsets, rows)
    if rows is None:
        y.add_(delta)
    else:
        y.index_add_(0, rows, delta)
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
    """``(dx, dbias, dA, dB)``, None where not needed: ``backward`` on ``grad_y[rows]``
    (``grad_y`` itself when the rows are in order), plus ``grad_y W`` for x (in place) and
    ``Σ_rows grad_y`` for the bias."""
    needs_x, needs_bias, needs_a, needs_b = needs
    ordered = grad_y if rows is None else grad_y.index_select(0, rows)
    grad_x, grad_a, grad_b = backward(
        ordered, x, lora_A, lora_B, scaling, offsets, rows, t, (needs_x, needs_a, needs_b)
    )
    if needs_x:
        grad_x.addmm_(grad_y, weight.to(grad_y.dtype))
    return grad_x, grad_y.sum(0) if needs_bias else None, grad_a, grad_b


def _uniform_add(
    x: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: Tensor, size: int, y: Tensor
) -> Tensor:
    """``y[:K·n] += δ`` for K groups of ``size`` = n rows each, x's rows in group order, y in
    the compute dtype: ``t = x_k A_kᵀ`` (batched), ``y_k += (s_k t_k) B_kᵀ`` (``baddbmm_``, the
    expand accumulating into y as ``lora_linear``'s ``addmm_`` does). Returns t (N, r)."""
    wide, n_groups = y.dtype, lora_A.shape[0]
    end = n_groups * size
    t = x.new_empty(x.shape[0], lora_A.shape[1], dtype=wide)
    if end < x.shape[0]:
        t[end:] = 0
    t_u = t[:end].view(n_groups, size, -1)
    torch.bmm(x[:end].to(wide).view(n_groups, size, -1), lora_A.to(wide).transpose(1, 2), out=t_u)
    scaled = t_u * scaling.to(wide).view(-1, 1, 1)
    y[:end].view(n_groups, size, -1).baddbmm_(scaled, lora_B.to(wide).transpose(1, 2))
    return t


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


# -- one grouped GEMM per product (torch._grouped_mm) -------------------------------------------

GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def grouped_mm_runs(device_type: str) -> bool:
    """Whether this torch has ``torch._grouped_mm`` and it runs on ``device_type`` (2-D x 3-D and
    2-D x 2-D with int32 offsets; probed once on a tiny case)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        offs = torch.tensor([2, 4], dtype=torch.int32, device=device_type)
        a = torch.ones(4, 8, device=device_type)
        torch._grouped_mm(a, torch.ones(2, 8, 4, device=device_type), offs=offs)
        torch._grouped_mm(a.T.contiguous(), a, offs=offs)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def _use_grouped_mm(
    x: Tensor, lora_A: Tensor, lora_B: Tensor, wide: torch.dtype, n_ordered: int
) -> bool:
    """The grouped-GEMM path: ``torch._grouped_mm`` runs here in ``wide``, and every operand's
    row length (in, r, out) is a multiple of 16 bytes (its stride rule); else the loop."""
    if wide not in GROUPED_MM_DTYPES or not n_ordered or not lora_A.shape[0]:
        return False
    align = 128 // torch.finfo(wide).bits  # elements in 16 bytes
    sizes = (x.shape[1], lora_A.shape[1], lora_B.shape[1])
    return all(size % align == 0 for size in sizes) and grouped_mm_runs(x.device.type)


def _grouped_mm_forward(
    x: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: Tensor,
    offsets: Tensor,
    rows: Tensor | None,
    wide: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """``forward`` as two grouped GEMMs over all ordered rows: ``t = x_o A_kᵀ``, then
    ``δ = t (s_k B_k)ᵀ`` (s folded into the K·out·r factor, not the M·out product)."""
    ordered = (x if rows is None else x.index_select(0, rows)).to(wide).contiguous()
    offs = offsets.to(torch.int32)
    t = torch._grouped_mm(ordered, lora_A.to(wide).contiguous().transpose(1, 2), offs=offs)
    delta = torch._grouped_mm(t, _scaled(lora_B, scaling, wide).transpose(1, 2), offs=offs)
    _zero_tail(offsets, t, delta)  # rows of no group: left unwritten by _grouped_mm
    return delta.to(x.dtype), t


def _grouped_mm_backward(
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
    """``backward`` as grouped GEMMs: ``dB_k = s_k (t_kᵀ g_k)ᵀ`` and ``dA_k = g_tᵀ x_k`` reduce
    over each group's rows (2-D x 2-D), ``g_t = g (s_k B_k)`` and ``dx_o = g_t A_k`` per row."""
    needs_x, needs_a, needs_b = needs
    wide, offs = t.dtype, offsets.to(torch.int32)
    g = grad.to(wide)
    grad_x = grad_a = grad_b = None
    if needs_b:  # (K, r, out) -> (K, out, r); rows of no group: outside every group's sum
        reduced = torch._grouped_mm(_transposed(t), g, offs=offs)
        # laid out as B (a permuted view's gradient lands in its base's layout: no copy there)
        grad_b = torch.empty_like(lora_B)
        torch.mul(reduced.mT, scaling.to(wide).view(-1, 1, 1), out=grad_b)
    if not (needs_x or needs_a):
        return grad_x, grad_a, grad_b
    g_t = torch._grouped_mm(g, _scaled(lora_B, scaling, wide), offs=offs)  # (M, r)
    if needs_a:
        ordered = (x if rows is None else x.index_select(0, rows)).to(wide).contiguous()
        grad_a = torch._grouped_mm(_transposed(g_t), ordered, offs=offs).to(lora_A.dtype)
    if needs_x:
        grad_o = torch._grouped_mm(g_t, lora_A.to(wide).contiguous(), offs=offs)  # (M, in)
        grad_o = grad_o.to(x.dtype)
        end = _zero_tail(offsets, grad_o)
        if rows is None:
            grad_x = grad_o
        else:
            grad_x = torch.zeros_like(x).index_add_(0, rows[:end], grad_o[:end])
    return grad_x, grad_a, grad_b


def _transposed(t: Tensor) -> Tensor:
    """``tᵀ`` (r, M) copied row-major, its row stride M rounded up to 16 bytes (the stride
    rule of ``torch._grouped_mm``; the padding columns are never read)."""
    align = 16 // t.element_size()
    padded = t.new_empty(t.shape[1], -(-t.shape[0] // align) * align)[:, : t.shape[0]]
    return padded.copy_(t.T)


def _scaled(lora_B: Tensor, scaling: Tensor, wide: torch.dtype) -> Tensor:
    """``s_k B_k`` (K, out, r) in ``wide``, contiguous whatever B's strides (one pass)."""
    scaled = torch.empty(lora_B.shape, dtype=wide, device=lora_B.device)
    return torch.mul(lora_B, scaling.to(wide).view(-1, 1, 1), out=scaled)


def _zero_tail(offsets: Tensor, *products: Tensor) -> int:
    """Zero the rows past the last group's end in each product; returns that end."""
    end = int(offsets[-1])
    for product in products:
        if end < product.shape[0]:
            product[end:] = 0
    return end
