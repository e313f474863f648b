"""Grouped (segmented) LoRA: rows in K contiguous groups, group k multiplied by its own factors.

One op serves two features:

- mixed-adapter batches: many LoRA adapters on one frozen base, row i of a batch uses adapter
  ``idx[i]`` (or none): ``y = x Wᵀ + b + s[idx]·B[idx] A[idx] x`` (``mixed_lora_linear``);
- LoRA on mixture-of-experts expert weights: token-expert pairs sorted by expert, expert e has
  its own A_e, B_e (the caller adds ``grouped_lora_delta``'s output to its grouped base GEMM).

This is Punica's SGMV (Chen et al. 2023, https://arxiv.org/abs/2310.18547) and S-LoRA's batched
LoRA (Sheng et al. 2023, https://arxiv.org/abs/2311.03285).

The segment convention is ``torch._grouped_mm``'s ``offs``: ``offsets`` (K,) holds the
cumulative ENDS of the groups in the ordered rows, group k = ordered rows
``[offsets[k-1], offsets[k])`` (``offsets[-1]`` of k = 0 is 0), empty groups allowed; ordered
rows past ``offsets[K-1]`` belong to no group and get δ = 0. The ordered rows are ``x[rows]``
(rows may repeat: MoE top-k > 1) or x itself.

Backends (``peft_kernels.backends``): ``naive`` (plain autograd loop, ``peft_kernels.naive``),
``torch`` (grouped or batched GEMMs, else a loop over the groups, with a hand-written backward,
``peft_kernels.torch_grouped``),
``triton`` (segmented SGMV kernels, ``peft_kernels.triton_grouped``). The hand-written backends
run through one ``peft_kernels.dual_op`` op (``torch.ops.peft_kernels.grouped_lora_delta``), so
``torch.compile(fullgraph=True)`` traces them.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from peft_kernels._validation import (
    _ADAPTER_DTYPES,
    _dtype_mismatch,
    _elsewhere,
    _not_a_tensor,
    check_frozen_and_scalars,
)
from peft_kernels.backends import TABLE, backend_module, resolve_backend
from peft_kernels.contract import present
from peft_kernels.dual_op import dual_op
from peft_kernels.row_groups import RowGroups, check_group_index
from peft_kernels.torch_grouped import group_all

__all__ = [
    "RowGroups",
    "group_rows",
    "grouped_lora_delta",
    "grouped_lora_linear",
    "mixed_lora_linear",
    "pad_factors",
]

# The modules of the hand-written backends of this op (``naive`` is ``peft_kernels.naive``).
_IMPLEMENTATIONS = {"torch": "peft_kernels.torch_grouped", "triton": "peft_kernels.triton_grouped"}
_INDEX_DTYPES = (torch.int32, torch.int64)

# -- checks -------------------------------------------------------------------------------------


def _check_factors(x: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: Tensor) -> None:
    """x (N, in) and the K groups' factors and scalings: types, dtypes, devices, shapes."""
    named = {"x": x, "lora_A": lora_A, "lora_B": lora_B, "scaling": scaling}
    for name, tensor in named.items():
        if not isinstance(tensor, Tensor):
            _not_a_tensor(name, tensor)
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if not lora_A.is_floating_point():
        raise TypeError(f"lora_A must be a floating-point tensor, got dtype {lora_A.dtype}")
    if lora_B.dtype != lora_A.dtype:
        _dtype_mismatch("lora_B", lora_B, "lora_A", lora_A.dtype, "the factors share one dtype")
    if (x.dtype, lora_A.dtype) not in _ADAPTER_DTYPES:
        raise TypeError(
            f"lora_A has dtype {lora_A.dtype}, narrower than x's {x.dtype}; the factors must "
            "have x's dtype or a wider one (e.g. float32 factors on a bfloat16 x)"
        )
    if not scaling.is_floating_point():
        raise TypeError(f"scaling must be a floating-point tensor, got dtype {scaling.dtype}")
    for name in ("lora_A", "lora_B", "scaling"):
        if named[name].device != x.device:
            _elsewhere(name, named[name], x.device)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (N, in), got shape {tuple(x.shape)}")
    if lora_A.dim() != 3:
        raise ValueError(f"lora_A must be 3-D (K, r, in), got shape {tuple(lora_A.shape)}")
    n_groups, rank, in_features = lora_A.shape
    if in_features != x.shape[1]:
        raise ValueError(
            f"lora_A must be (K, r, in) = (K, r, {x.shape[1]}) for x {tuple(x.shape)}, "
            f"got {tuple(lora_A.shape)}"
        )
    if rank == 0:
        raise ValueError("rank r must be >= 1, but lora_A has shape (K, 0, in)")
    if lora_B.dim() != 3 or lora_B.shape[0] != n_groups or lora_B.shape[2] != rank:
        raise ValueError(
            f"lora_B must be (K, out, r) = ({n_groups}, out, {rank}), got {tuple(lora_B.shape)}"
        )
    if scaling.shape != (n_groups,):
        raise ValueError(f"scaling must be (K,) = ({n_groups},), got {tuple(scaling.shape)}")
    if scaling.requires_grad:
        raise ValueError("scaling must not require grad: it gets no gradient (detach it)")


def _check_grouped(
    x: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: Tensor,
    offsets: Tensor,
    rows: Tensor | None,
) -> None:
    """Every argument of ``grouped_lora_delta``, then (eagerly, one host sync) the values."""
    _check_factors(x, lora_A, lora_B, scaling)
    if not isinstance(offsets, Tensor):
        _not_a_tensor("offsets", offsets)
    if rows is not None and not isinstance(rows, Tensor):
        _not_a_tensor("rows", rows)
    if offsets.dtype not in _INDEX_DTYPES:
        raise TypeError(f"offsets must be int32 or int64, got dtype {offsets.dtype}")
    if rows is not None and rows.dtype != torch.int64:
        raise TypeError(f"rows must be int64, got dtype {rows.dtype}")
    for name, tensor in (("offsets", offsets), ("rows", rows)):
        if tensor is not None and tensor.device != x.device:
            _elsewhere(name, tensor, x.device)
    if offsets.shape != (lora_A.shape[0],):
        raise ValueError(f"offsets must be (K,) = ({lora_A.shape[0]},), got {tuple(offsets.shape)}")
    if rows is not None and rows.dim() != 1:
        raise ValueError(f"rows must be 1-D (M,), got shape {tuple(rows.shape)}")
    if torch.compiler.is_compiling():  # value checks read the tensors: eager only
        return
    _check_values(x.shape[0], scaling, offsets, rows)


def _check_values(n_rows: int, scaling: Tensor, offsets: Tensor, rows: Tensor | None) -> None:
    """Offsets non-decreasing from >= 0 to <= M, rows in [0, N), finite scalings: one sync."""
    n_ordered = n_rows if rows is None else rows.shape[0]
    checks = [torch.isfinite(scaling).all()]
    if offsets.numel():
        checks.append(offsets[0] >= 0)
        checks.append((offsets[1:] >= offsets[:-1]).all())
        checks.append(offsets[-1] <= n_ordered)
    if rows is not None and rows.numel():
        checks.append(((rows >= 0) & (rows < n_rows)).all())
    passed = torch.stack(checks).tolist()
    if not passed[0]:
        raise ValueError(f"scaling must be finite, got {scaling.tolist()}")
    if not all(passed[1:4]):
        raise ValueError(
            "offsets must be the non-decreasing cumulative ends of the groups, from >= 0 to "
            f"<= M = {n_ordered} (the number of ordered rows), got {offsets.tolist()}"
        )
    if not all(passed[4:]):
        raise ValueError(f"rows must index x's {n_rows} rows: every value in [0, {n_rows})")


# -- grouping helpers ---------------------------------------------------------------------------


def group_rows(group_index: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """``(rows, offsets)`` for ``grouped_lora_delta`` from per-row group ids.

    Args:
        group_index: (N,) integer, values in ``[0, num_groups)`` or -1 (the row has no group).
        num_groups: K.

    Returns:
        rows (M,) int64, the row numbers sorted by group (stable: within a group in their
        order); offsets (K,) int64, the cumulative ends of the groups. Rows with -1 are left
        out: M is the number of ids >= 0 (a host sync; ``mixed_lora_linear`` keeps them, last,
        and needs none).

    Raises:
        TypeError / ValueError: a non-integer or non-1-D ``group_index``, ids out of range.
    """
    check_group_index(group_index, num_groups)
    rows, offsets = group_all(group_index, num_groups)
    if not num_groups:
        return rows[:0], offsets
    return rows[: int(offsets[-1])], offsets


def pad_factors(As: Sequence[Tensor], Bs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Stack K factor pairs of possibly different ranks into zero-padded ``(lora_A, lora_B)``.

    Args:
        As: K tensors A_k (r_k, in), one dtype and device.
        Bs: K tensors B_k (out, r_k), A's dtype and device.

    Returns:
        lora_A (K, r_max, in) and lora_B (K, out, r_max), zero past each r_k. The padding adds
        zero terms only (``(x A_kᵀ)`` gets zero columns that meet zero columns of B_k), and the
        stack is differentiable: each A_k, B_k gets its gradient, the padding none.

    Raises:
        ValueError: no pairs, K mismatch, shapes that do not fit, r_k = 0, mixed devices.
        TypeError: non-tensors or mixed dtypes.
    """
    if len(As) != len(Bs):
        raise ValueError(f"As and Bs must have one entry per group, got {len(As)} and {len(Bs)}")
    if not len(As):
        raise ValueError("As and Bs must hold at least one factor pair")
    first = As[0]
    for k, (a, b) in enumerate(zip(As, Bs, strict=True)):
        for name, tensor in ((f"As[{k}]", a), (f"Bs[{k}]", b)):
            if not isinstance(tensor, Tensor):
                _not_a_tensor(name, tensor)
            if tensor.dtype != first.dtype:
                _dtype_mismatch(name, tensor, "As[0]", first.dtype, "the factors share one dtype")
            if tensor.device != first.device:
                raise ValueError(f"{name} is on {tensor.device} but As[0] is on {first.device}")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] == 0:
            raise ValueError(
                f"As[{k}] must be (r_k, in) with r_k >= 1 and Bs[{k}] (out, r_k); got shapes "
                f"{tuple(a.shape)} and {tuple(b.shape)}"
            )
        if a.shape[1] != first.shape[1] or b.shape != (Bs[0].shape[0], a.shape[0]):
            raise ValueError(
                f"As[{k}] {tuple(a.shape)} and Bs[{k}] {tuple(b.shape)} do not fit: expected "
                f"(r_k, {first.shape[1]}) and ({Bs[0].shape[0]}, r_k)"
            )
    r_max = max(a.shape[0] for a in As)
    if all(a.shape[0] == r_max for a in As):  # one rank: stack alone (F.pad would copy first)
        return torch.stack(list(As)), torch.stack(list(Bs))
    lora_A = torch.stack([F.pad(a, (0, 0, 0, r_max - a.shape[0])) for a in As])
    lora_B = torch.stack([F.pad(b, (0, r_max - b.shape[1])) for b in Bs])
    return lora_A, lora_B


# -- the op -------------------------------------------------------------------------------------


def grouped_lora_delta(
    x: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: Tensor,
    offsets: Tensor,
    rows: Tensor | None = None,
    *,
    backend: str | None = None,
) -> Tensor:
    """Segmented LoRA: ``δ_j = s_k · (x_o[j] A_kᵀ) B_kᵀ`` for ordered row j in group k.

    Args:
        x: (N, in), any float dtype.
        lora_A: (K, r, in): group k's A; ranks that differ are zero-padded to r (``pad_factors``).
            x's dtype or wider (float32 factors on a bfloat16 x).
        lora_B: (K, out, r), lora_A's dtype.
        scaling: (K,) float, s_k; a constant (no gradient; must not require grad).
        offsets: (K,) int32 / int64, the cumulative ENDS of the groups in the ordered rows
            (``torch._grouped_mm``'s ``offs``): group k = ordered rows
            ``[offsets[k-1], offsets[k])``; non-decreasing, ``offsets[-1] <= M``.
        rows: (M,) int64: the ordered rows are ``x[rows]`` (values in [0, N), repeats allowed;
            the gradient of x accumulates over repeats); None: x itself (M = N).
        backend: "naive" | "torch" | "triton" | "auto" (None = "auto"), see
            ``peft_kernels.backends``.

    Returns:
        δ (M, out) in x's dtype, in the order of the ordered rows; rows ``j >= offsets[-1]``
        get 0. The math runs in ``promote(x.dtype, lora_A.dtype)`` (fp32 accumulation).

    Gradients for x (N, in), lora_A and lora_B; none for scaling, offsets and rows.

    Raises:
        TypeError / ValueError: bad types, dtypes, shapes, devices or index values (offsets
            not monotone or past M, rows out of range), naming the argument, before any work.
        RuntimeError: an explicitly requested backend cannot run here.
    """
    _check_grouped(x, lora_A, lora_B, scaling, offsets, rows)
    return _run(x, lora_A, lora_B, scaling, offsets, rows, backend)


def _run(x, lora_A, lora_B, scaling, offsets, rows, backend: str | None) -> Tensor:
    """The checked op on the backend that resolves from ``backend``."""
    backend = resolve_backend("auto" if backend is None else backend, x.device)
    if not TABLE[backend].hand_written:
        return backend_module(backend).grouped_lora_delta(x, lora_A, lora_B, scaling, offsets, rows)
    return _grouped_lora_delta(x, lora_A, lora_B, scaling, offsets, rows, backend)


def _implementation(backend: str):
    return importlib.import_module(_IMPLEMENTATIONS[backend])


def _forward(
    x: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: Tensor,
    offsets: Tensor,
    rows: Tensor | None,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """``(δ (M, out), t (M, r))`` from ``backend`` ("torch" | "triton")."""
    return _implementation(backend).forward(x, lora_A, lora_B, scaling, offsets, rows)


def _forward_fake(x, lora_A, lora_B, scaling, offsets, rows, backend):
    n_ordered = x.shape[0] if rows is None else rows.shape[0]
    wide = torch.promote_types(x.dtype, lora_A.dtype)
    return (
        x.new_empty(n_ordered, lora_B.shape[1]),
        x.new_empty(n_ordered, lora_A.shape[1], dtype=wide),
    )


def _save(args: tuple, out: tuple) -> tuple[tuple, tuple[str]]:
    """x (not ``x[rows]``), the factors, scaling, offsets, rows and t (M, r)."""
    x, lora_A, lora_B, scaling, offsets, rows, backend = args
    return (x, lora_A, lora_B, scaling, offsets, rows, out[1]), (backend,)


def _backward(
    grad: Tensor,
    saved: list[Tensor | None],
    backend: str,
    needs: list[bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx (N, in), dA (K, r, in), dB (K, out, r))``, None where not needed. ``rows`` is an
    input, not an output: None stays None (an empty ``rows`` means M = 0)."""
    x, lora_A, lora_B, scaling, offsets, rows, t = saved
    return _implementation(backend).backward(
        grad.contiguous(), x, lora_A, lora_B, scaling, offsets, rows, t, tuple(needs)
    )


def _backward_fake(grad, saved, backend, needs):
    x, lora_A, lora_B = saved[:3]
    return tuple(
        torch.empty_like(like) if need else like.new_empty(0)
        for like, need in zip((x, lora_A, lora_B), needs, strict=True)
    )


_grouped_lora_delta = dual_op(
    "grouped_lora_delta",
    forward=_forward,
    forward_fake=_forward_fake,
    save=_save,
    backward=_backward,
    backward_fake=_backward_fake,
    differentiable=("x", "lora_A", "lora_B"),
)


# -- mixed-adapter linear -----------------------------------------------------------------------


def mixed_lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: Tensor,
    adapter_index: Tensor,
    *,
    backend: str | None = None,
) -> Tensor:
    """A mixed-adapter batch: row i uses adapter ``idx[i]``,
    ``y_i = x_i Wᵀ + b + s[idx_i] · B[idx_i] A[idx_i] x_i`` (``idx_i = -1``: the base only).

    Args:
        x: (..., in); its leading dimensions flattened are the N rows.
        weight: W (out, in), frozen (must not require grad), x's dtype.
        bias: (out,) or None, x's dtype (it gets a gradient when it requires grad).
        lora_A: (K, r, in), lora_B: (K, out, r), scaling: (K,): the K adapters, as in
            ``grouped_lora_delta`` (ranks that differ: ``pad_factors``).
        adapter_index: (N,) integer, values in [0, K) or -1.
        backend: as in ``grouped_lora_delta``; the base product is ``F.linear``.

    Returns:
        y (..., out) in x's dtype (the autocast dtype under autocast).

    The rows are sorted by adapter (``group_rows``, the rows of no adapter last, where they get
    δ = 0) and the grouped delta of the sorted rows is added back at their places in the base
    output ``F.linear(x, W, b)``, in place: the triton backend's expand kernel adds into it
    directly (no (N, out) δ), the torch backend uses ``index_add_``. The ids are checked in one
    host sync (eagerly), then the base GEMM is launched before the rows are grouped.
    One ``torch.library`` op (``peft_kernels::mixed_lora_linear``), no data-dependent shape:
    ``torch.compile`` traces it whole. The bias has x's dtype; its gradient is
    ``Σ_rows grad_y``. Many layers over one batch: ``grouped_lora_linear`` sorts once.
    """
    if isinstance(x, Tensor) and torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return mixed_lora_linear(
                *_autocast_operands(x, weight, bias), lora_A, lora_B, scaling, adapter_index,
                backend=backend,
            )  # fmt: skip
    flat = _check_linear(x, weight, bias, lora_A, lora_B, scaling)
    if isinstance(adapter_index, Tensor) and adapter_index.shape != (flat.shape[0],):
        raise ValueError(
            f"adapter_index must be (N,) = ({flat.shape[0]},) (x's leading dimensions "
            f"flattened), got {tuple(adapter_index.shape)}"
        )
    if isinstance(adapter_index, Tensor) and adapter_index.device != x.device:
        _elsewhere("adapter_index", adapter_index, x.device)
    backend = resolve_backend("auto" if backend is None else backend, x.device)
    # last: the values (ids, finite scalings) in one host sync, right before the launches
    check_group_index(adapter_index, lora_A.shape[0], "adapter_index", scaling)
    # rows and offsets are valid by construction: no second value check
    if not TABLE[backend].hand_written:  # naive: the reference loop, then a scatter
        rows, offsets = group_all(adapter_index, lora_A.shape[0])
        y = _naive_linear(flat, weight, bias, lora_A, lora_B, scaling, offsets, rows)
    else:
        idx = adapter_index.to(torch.int64)
        y = _mixed_lora_linear(
            flat, weight, bias, lora_A, lora_B, scaling, idx, None, None, backend
        )
    return y.view(*x.shape[:-1], weight.shape[0])


def grouped_lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: Tensor,
    groups: RowGroups,
    *,
    backend: str | None = None,
) -> Tensor:
    """``mixed_lora_linear`` over rows grouped once for many layers (``RowGroups``):
    ``y = x Wᵀ + b``, then ordered row j of group k (x's row ``rows[j]``) gets
    ``s_k · B_k A_k x_{rows[j]}``; the rows past ``offsets[-1]`` get the base alone.

    Args:
        x: (..., in); its leading dimensions flattened are the N = ``groups.n_rows`` rows.
        weight, bias, lora_A, lora_B, scaling, backend: as in ``mixed_lora_linear``.
        groups: the rows' groups (``RowGroups``; its values were checked when it was made).

    Returns:
        y (..., out) in x's dtype (the autocast dtype under autocast).

    The torch backend adds δ into the base output in place: with ``groups.rows`` None and
    groups of one size (a batch spread evenly and in order over its adapters) as one batched
    GEMM accumulating into y (``baddbmm_``: no (N, out) δ at all), else through ``index_add_``.
    One host sync per call, eagerly: the scalings' finiteness.

    Raises:
        TypeError / ValueError: as ``mixed_lora_linear``; ``groups`` not a ``RowGroups``, of
            another row count, group count or device, or changed in place since made.
    """
    if isinstance(x, Tensor) and torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return grouped_lora_linear(
                *_autocast_operands(x, weight, bias), lora_A, lora_B, scaling, groups,
                backend=backend,
            )  # fmt: skip
    flat = _check_linear(x, weight, bias, lora_A, lora_B, scaling)
    if not isinstance(groups, RowGroups):
        raise TypeError(f"groups must be a RowGroups, got {type(groups).__name__}")
    if groups.n_rows != flat.shape[0] or groups.offsets.shape != (lora_A.shape[0],):
        raise ValueError(
            f"groups must group x's N = {flat.shape[0]} rows into K = {lora_A.shape[0]} groups, "
            f"got {groups.n_rows} rows in {groups.offsets.shape[0]} groups"
        )
    if groups.device != x.device:
        _elsewhere("groups", groups.offsets, x.device)
    backend = resolve_backend("auto" if backend is None else backend, x.device)
    if not torch.compiler.is_compiling():
        groups.check_unchanged()
        if not bool(torch.isfinite(scaling).all()):
            raise ValueError(f"scaling must be finite, got {scaling.tolist()}")
    offsets, rows = groups.offsets, groups.rows
    if not TABLE[backend].hand_written:
        y = _naive_linear(flat, weight, bias, lora_A, lora_B, scaling, offsets, rows)
    else:
        y = _mixed_lora_linear(
            flat, weight, bias, lora_A, lora_B, scaling, None, offsets, rows, backend
        )
    return y.view(*x.shape[:-1], weight.shape[0])


def _autocast_operands(x: Tensor, weight, bias) -> tuple:
    """x, W and b in the autocast dtype (the factors keep theirs, as under ``lora_linear``)."""
    autocast = torch.get_autocast_dtype(x.device.type)
    return (
        x.to(autocast),
        weight.to(autocast) if isinstance(weight, Tensor) else weight,
        bias.to(autocast) if isinstance(bias, Tensor) else bias,
    )


def _check_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scaling
) -> Tensor:
    """The checks the two mixed linear ops share; returns x's rows (N, in), contiguous."""
    for name, tensor in (("x", x), ("weight", weight), ("bias", bias)):
        if tensor is not None and not isinstance(tensor, Tensor):
            _not_a_tensor(name, tensor)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., in)")
    flat = x.reshape(-1, x.shape[-1])
    _check_factors(flat, lora_A, lora_B, scaling)
    if weight.dim() != 2 or weight.shape != (lora_B.shape[1], x.shape[-1]):
        raise ValueError(
            f"weight must be (out, in) = ({lora_B.shape[1]}, {x.shape[-1]}) (out from lora_B, "
            f"in from x), got {tuple(weight.shape)}"
        )
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is None:
            continue
        if tensor.dtype != x.dtype:
            _dtype_mismatch(name, tensor, "x", x.dtype, "cast them to one dtype")
        if tensor.device != x.device:
            _elsewhere(name, tensor, x.device)
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be (out,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    check_frozen_and_scalars(weight, 1.0, 0.0)
    return flat if flat.is_contiguous() else flat.contiguous()


def _naive_linear(flat, weight, bias, lora_A, lora_B, scaling, offsets, rows) -> Tensor:
    """The reference: the naive loop's δ of the ordered rows, added at their places."""
    delta = _run(flat, lora_A, lora_B, scaling, offsets, rows, "naive")
    y = F.linear(flat, weight, bias)
    return y + delta if rows is None else y.index_add(0, rows, delta)


def _mixed_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: Tensor,
    adapter_index: Tensor | None,
    offsets: Tensor | None,
    rows: Tensor | None,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """``(y (N, out), t (N, r), rows (N,) or None, offsets (K,))`` from ``backend`` ("torch" |
    "triton"): the base product, then the delta of the rows grouped by adapter added at their
    places. Grouped from ``adapter_index`` (``group_all``: ``rows`` a permutation, the rows of
    no adapter last; the base GEMM launched first, so the small grouping ops run on the CPU
    behind it), or, ``adapter_index`` None, the given ``offsets`` and ``rows`` (a permutation,
    or None: in order)."""
    return _implementation(backend).mixed_forward(
        x, weight, bias, lora_A, lora_B, scaling, adapter_index, offsets, rows
    )


def _mixed_forward_fake(
    x, weight, bias, lora_A, lora_B, scaling, adapter_index, offsets, rows, backend
):
    wide = torch.promote_types(x.dtype, lora_A.dtype)
    grouped_here = adapter_index is not None
    return (
        x.new_empty(x.shape[0], weight.shape[0]),
        x.new_empty(x.shape[0], lora_A.shape[1], dtype=wide),
        x.new_empty(x.shape[0] if grouped_here or rows is not None else 0, dtype=torch.int64),
        x.new_empty(lora_A.shape[0], dtype=torch.int64),
    )


def _mixed_save(args: tuple, out: tuple) -> tuple[tuple, tuple[str]]:
    """x, W, the factors, scaling, offsets, rows and t (N, r); never an (N, out) tensor."""
    x, weight, _bias, lora_A, lora_B, scaling, _adapter_index, _offsets, _rows, backend = args
    _y, t, rows, offsets = out
    return (x, weight, lora_A, lora_B, scaling, offsets, present(rows), t), (backend,)


def _mixed_backward(
    grad: Tensor,
    saved: list[Tensor | None],
    backend: str,
    needs: list[bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """``(dx (N, in), dbias (out,), dA, dB)``, None where not needed."""
    return _implementation(backend).mixed_backward(grad.contiguous(), *saved, tuple(needs))


def _mixed_backward_fake(grad, saved, backend, needs):
    x, weight, lora_A, lora_B = saved[:4]
    likes = (x, weight[:, 0], lora_A, lora_B)
    return tuple(
        torch.empty_like(like) if need else like.new_empty(0)
        for like, need in zip(likes, needs, strict=True)
    )


_mixed_lora_linear = dual_op(
    "mixed_lora_linear",
    forward=_mixed_forward,
    forward_fake=_mixed_forward_fake,
    save=_mixed_save,
    backward=_mixed_backward,
    backward_fake=_mixed_backward_fake,
    differentiable=("x", "bias", "lora_A", "lora_B"),
)
