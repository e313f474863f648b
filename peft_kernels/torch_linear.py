"""PyTorch backend: hand-written LoRA / DoRA forward and backward (the CPU path).

Implements ``peft_kernels.contract`` (LoRA when ``magnitude`` is None). Lean by construction:
in-place ``addmm_`` accumulation, no out×in temporary ever, one M×out buffer in DoRA's backward.
Dropout draws a bool keep-mask from a generator seeded by ``seed``; the mask (1 byte per element
of x) is the dropout state backward gets, never ``dropout(x)``.

Dtypes: the base GEMMs run in the compute dtype (x's), the adapter branch in the adapter dtype
(A's). When the two are equal (the common case) the low-rank term is accumulated into the base
output in place; with float32 adapters on a bfloat16 base, ``u``, ``grad_y B``, ``grad_yᵀ u``
and the adapter gradients are float32 and the low-rank term joins the base output with one
rounding, as peft does.

DoRA, ``c = m / n``, needs ``grad_m = Σ_rows grad_y ⊙ base / n`` with ``base = x̃ Wᵀ + s·u Bᵀ``.
The low-rank part of that sum is ``s·⟨(grad_yᵀ u)_i, B_i⟩``, from the (out, r) product that
grad_B needs anyway; for the dense part ``x̃ Wᵀ`` there are two ways:

- no dropout, one dtype: nothing is kept but the output y itself (the storage its consumer
  usually saves anyway): ``grad_m = (Σ_rows grad_y ⊙ y − b ⊙ Σ_rows grad_y) / m``. Columns with
  ``|c| < MIN_RECOVERABLE_SCALE`` (m ≈ 0: y holds almost nothing of base there) get their base
  column recomputed from x and u instead.
- dropout, or adapters wider than x: the dense GEMM output ``x̃ Wᵀ`` (M, out) is kept
  (``Forward.base``); in bfloat16 it is rounded once, as peft's base output is, where y is
  rounded twice (the GEMM, then the sum).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from peft_kernels.contract import Forward, Grads, Saved

MIN_RECOVERABLE_SCALE = 2.0**-7


def keep_mask(seed: Tensor, shape: tuple[int, ...], dropout_p: float) -> Tensor:
    """Bool keep-mask of ``shape``: True with probability ``1 − p`` (p rounded to 1/65536).

    Drawn from a generator seeded by ``seed``, 16 random bits per element: 64-bit words from the
    generator, each read as four 16-bit lanes compared with ``p·2¹⁶``. A quarter of the draws of
    ``torch.rand(shape) >= p`` (twice as fast on the CPU, where the mask of a 512×576 input took
    as long as a rank-16 GEMM over it).
    """
    generator = torch.Generator(device=seed.device)
    generator.manual_seed(int(seed.item()))
    numel = math.prod(shape)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=seed.device)
    words.random_(-(2**63), 2**63 - 1, generator=generator)  # all 64 bits uniform
    # lanes are uniform over int16: lane + 2¹⁵ >= round(p·2¹⁶) keeps with probability 1 − p
    threshold = min(round(dropout_p * 65536), 65535) - 32768
    return (words.view(torch.int16)[:numel] >= threshold).view(shape)


def dropout_state_spec(
    x_shape: tuple[int, ...], dropout_p: float
) -> tuple[tuple[int, ...], torch.dtype]:
    """The keep-mask: bool, shaped like x; no dropout, no mask."""
    return (tuple(x_shape) if dropout_p > 0 else (0,)), torch.bool


def dora_keeps_base(dropout_p: float, dtype: torch.dtype, adapter_dtype: torch.dtype) -> bool:
    """Whether DoRA keeps its dense output ``x̃ Wᵀ`` (else backward reads y; see above)."""
    return dropout_p > 0 or adapter_dtype != dtype


def _dropped(x: Tensor, keep: Tensor | None, dropout_p: float) -> Tensor:
    """``x̃ = x ⊙ keep / (1 − p)`` (a new M×in tensor), or ``x`` itself without dropout."""
    if keep is None:
        return x
    return x.mul(keep).mul_(1.0 / (1.0 - dropout_p))


def _add_low_rank(out: Tensor, lhs: Tensor, rhs: Tensor, scaling: float) -> Tensor:
    """``out += scaling · lhs @ rhs`` in place; a wider ``lhs`` (adapter dtype) is rounded once."""
    if lhs.dtype == out.dtype:
        return out.addmm_(lhs, rhs, alpha=scaling)
    return out.add_(lhs @ rhs.to(lhs.dtype), alpha=scaling)


def _column_scale(magnitude: Tensor, weight_norm: Tensor) -> Tensor:
    """DoRA's ``c = m / n`` (out,) in the norm's precision (at least float32)."""
    return magnitude.to(weight_norm.dtype) / weight_norm


def _product(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """``a ⊙ b`` (a new tensor), computed in ``dtype`` when ``a`` is narrower (exact products)."""
    if a.dtype == dtype and b.dtype == dtype:
        return torch.mul(a, b)
    return a.to(dtype) * b.to(dtype)


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
    """LoRA: ``y = x Wᵀ + b + s·u Bᵀ`` with ``u = x̃ Aᵀ``.

    DoRA (``magnitude`` given), ``c = m / n``:
        no dropout:  ``y = c ⊙ (x Wᵀ + s·u Bᵀ) + b``
        dropout:     ``y = (x − x̃) Wᵀ + c ⊙ (x̃ Wᵀ + s·u Bᵀ) + b``  (peft's definition)
    """
    keep = None if seed is None else keep_mask(seed, tuple(x.shape), dropout_p)
    x_dropped = x if keep is None else _dropped(x, keep, dropout_p)
    u = F.linear(x_dropped.to(lora_A.dtype), lora_A)
    if magnitude is None:
        y = F.linear(x, weight, bias)
        if u.dtype == y.dtype:
            return Forward(y.addmm_(u, lora_B.T, alpha=scaling), u, keep, None)
        return Forward(_add_low_rank(y, u, lora_B.T, scaling), u, keep, None)

    column_scale = _column_scale(magnitude, weight_norm)
    dense = x_dropped @ weight.T
    if not dora_keeps_base(dropout_p, x.dtype, u.dtype):  # in place: y is the GEMM's buffer
        dense.addmm_(u, lora_B.T, alpha=scaling)
        scale = column_scale.to(x.dtype)
        y = dense.mul_(scale) if bias is None else torch.addcmul(bias, dense, scale, out=dense)
        return Forward(y, u, keep, None)
    # y = [(x − x̃) Wᵀ] + c ⊙ x̃ Wᵀ + s·u (c ⊙ B)ᵀ + b, the scale folded into B's rows
    scaled_b = (lora_B * column_scale[:, None].to(lora_B.dtype)).T
    if u.dtype == x.dtype:
        y = (
            torch.addmm(bias, x - x_dropped, weight.T)
            if bias is not None
            else (x - x_dropped) @ weight.T
        )
        y.addcmul_(dense, column_scale.to(x.dtype))
        return Forward(y.addmm_(u, scaled_b, alpha=scaling), u, keep, dense)
    wide = (u @ scaled_b).mul_(scaling).addcmul_(dense, column_scale.to(u.dtype))
    if keep is not None:
        wide += (x - x_dropped) @ weight.T
    if bias is not None:
        wide += bias
    return Forward(wide.to(x.dtype), u, keep, dense)


def _adapter_grads(
    grad: Tensor,
    x_dropped: Tensor,
    lora_B: Tensor,
    u: Tensor,
    scaling: float,
    column_scale: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Adapter gradients from ``grad`` (M, out), the gradient of the layer's output, in the
    adapter dtype; ``column_scale`` c (DoRA) or None (LoRA, c = 1). With ``P = gradᵀ u``:

        grad_u = s·(grad ⊙ c) B = s·grad (c ⊙ B)   (M, r)      grad_A = grad_uᵀ x̃   (r, in)
        grad_B = s·c ⊙ P   (out, r)                           low_rank = s·⟨P_i, B_i⟩ (out,)

    ``low_rank`` is the low-rank part of DoRA's ``Σ_rows grad ⊙ base`` (None for LoRA).
    """
    grad = grad.to(u.dtype)
    # P = gradᵀ u as (uᵀ grad)ᵀ: a GEMM whose long dimension is contiguous in both operands
    # (up to 1.7x faster on the CPU for out=1536 than reading grad transposed), then made
    # contiguous: an (out, r) copy
    product = (u.T @ grad).T.contiguous()
    if column_scale is None:
        grad_u = (grad @ lora_B).mul_(scaling)
        return grad_u, grad_u.T @ x_dropped.to(u.dtype), product.mul_(scaling), None
    scale = column_scale[:, None].to(u.dtype)
    grad_u = (grad @ (lora_B * scale)).mul_(scaling)
    low_rank = torch.linalg.vecdot(product, lora_B.to(u.dtype)).mul_(scaling)
    grad_lora_B = product.mul_(scale).mul_(scaling)
    return grad_u, grad_u.T @ x_dropped.to(u.dtype), grad_lora_B, low_rank


def _magnitude_grad(
    grad_y: Tensor,
    buffer: Tensor,
    grad_bias_sum: Tensor | None,
    low_rank: Tensor,
    saved: Saved,
    from_output: bool,
) -> Tensor:
    """DoRA's ``grad_m`` (out,) in the norm's dtype, from ``buffer = grad_y ⊙ dora_out``.

    ``dora_out`` is y (``from_output``): ``(Σ_rows grad_y ⊙ y − b ⊙ Σ_rows grad_y) / m``, with
    the columns where ``|c| < MIN_RECOVERABLE_SCALE`` recomputed from x and u. Else it is
    ``x̃ Wᵀ``: ``(Σ_rows grad_y ⊙ x̃ Wᵀ + low_rank) / n``.
    """
    norm = saved.weight_norm
    column_sums = buffer.sum(0, dtype=norm.dtype)
    if not from_output:
        return (column_sums + low_rank.to(norm.dtype)) / norm
    magnitude = saved.magnitude.to(norm.dtype)
    if saved.bias is not None:
        column_sums -= saved.bias.to(norm.dtype) * grad_bias_sum.to(norm.dtype)
    grad_magnitude = column_sums / magnitude
    unrecoverable = (magnitude / norm).abs() < MIN_RECOVERABLE_SCALE
    if bool(unrecoverable.any()):
        columns = unrecoverable.nonzero().squeeze(1)
        dense = (saved.x @ saved.weight[columns].T).to(norm.dtype)
        sums = _product(grad_y[:, columns], dense, norm.dtype).sum(0)
        grad_magnitude[columns] = (sums + low_rank[columns].to(norm.dtype)) / norm[columns]
    return grad_magnitude


def backward(
    grad_y: Tensor,
    saved: Saved,
    *,
    scaling: float,
    dropout_p: float,
    needs_grad_x: bool,
    needs_grad_bias: bool,
) -> Grads:
    """Gradients of ``forward``. With ``G = grad_y ⊙ c`` (c = 1 for LoRA), ``grad_u = s·G B``:

    grad_A = grad_uᵀ x̃,  grad_B = s·Gᵀ u,  grad_bias = Σ_rows grad_y
    grad_x = G W + (grad_u A) ⊙ keep/(1−p)                      (LoRA; DoRA without dropout)
    grad_x = grad_y W + [(G − grad_y) W + grad_u A] ⊙ keep/(1−p)  (DoRA with dropout)
    grad_m = Σ_rows grad_y ⊙ (x̃ Wᵀ + s·u Bᵀ) / n                (DoRA)
    """
    x, weight, lora_A, u = saved.x, saved.weight, saved.lora_A, saved.u
    keep = saved.dropout_state
    x_dropped = _dropped(x, keep, dropout_p)
    dora = saved.magnitude is not None
    needs_bias_sum = needs_grad_bias or (dora and saved.bias is not None)
    grad_bias_sum = grad_y.sum(0) if needs_bias_sum else None
    grad_bias = grad_bias_sum if needs_grad_bias else None

    if not dora:
        grad_u, grad_lora_A, grad_lora_B, _ = _adapter_grads(
            grad_y, x_dropped, saved.lora_B, u, scaling, None
        )
        grad_x = None
        if needs_grad_x:
            grad_x = grad_y @ weight
            if keep is None:
                _add_low_rank(grad_x, grad_u, lora_A, 1.0)
            else:
                grad_x.add_((grad_u @ lora_A).mul_(keep), alpha=1.0 / (1.0 - dropout_p))
        return Grads(grad_x, grad_lora_A, grad_lora_B, None, grad_bias)

    norm = saved.weight_norm
    column_scale = _column_scale(saved.magnitude, norm)
    grad_u, grad_lora_A, grad_lora_B, low_rank = _adapter_grads(
        grad_y, x_dropped, saved.lora_B, u, scaling, column_scale
    )
    from_output = not dora_keeps_base(dropout_p, x.dtype, u.dtype)
    buffer = _product(grad_y, saved.dora_out, norm.dtype)  # grad_y ⊙ (y or x̃ Wᵀ)
    grad_magnitude = _magnitude_grad(grad_y, buffer, grad_bias_sum, low_rank, saved, from_output)
    grad_x = None
    if needs_grad_x:
        # G = grad_y ⊙ c, into the product buffer when it has grad_y's dtype (free now)
        scale = column_scale.to(grad_y.dtype)
        out = buffer if buffer.dtype == grad_y.dtype else None
        grad_scaled = torch.mul(grad_y, scale, out=out) if out is not None else grad_y * scale
        if keep is None:
            grad_x = _add_low_rank(grad_scaled @ weight, grad_u, lora_A, 1.0)
        else:
            masked = grad_scaled.sub_(grad_y) @ weight  # (G − g) W
            masked = _add_low_rank(masked, grad_u, lora_A, 1.0).mul_(keep)
            grad_x = (grad_y @ weight).add_(masked, alpha=1.0 / (1.0 - dropout_p))
    grad_magnitude = grad_magnitude.to(saved.magnitude.dtype)
    return Grads(grad_x, grad_lora_A, grad_lora_B, grad_magnitude, grad_bias)
