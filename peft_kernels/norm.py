"""DoRA's weight norm without the out×in matrix ``W + s·B A``.

For row i:  ``n_i² = ‖W_i‖² + 2s·⟨(W Aᵀ)_i, B_i⟩ + s²·B_i (A Aᵀ) B_iᵀ``.
The costs are one (out×in)·(in×r) GEMM and (r×r)/(out×r) work, against peft's out×in
matrix build, out×in×r GEMM and a pass over the out×in result on every forward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from peft_kernels._validation import check_weight_norm_inputs


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the norm is computed in: at least float32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def weight_row_sq_norm(weight: Tensor) -> Tensor:
    """``‖W_i‖²`` per output row, (out,), in ``norm_dtype``. Cacheable: W is frozen."""
    return torch.linalg.vector_norm(weight.detach(), dim=1, dtype=norm_dtype(weight.dtype)).square()


def dora_weight_norm(
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    weight_sq_norm: Tensor | None = None,
) -> Tensor:
    """Row norms ``n_i = ‖W_i + s·(B A)_i‖₂`` of DoRA, detached (a constant for backward).

    Args:
        weight: W (out, in), frozen.
        lora_A: A (r, in).
        lora_B: B (out, r).
        scaling: s.
        weight_sq_norm: optional cached ``‖W_i‖²`` (out,) from ``weight_row_sq_norm``.

    Returns:
        n (out,) in float32, or float64 for float64 inputs; squared terms are clamped at 0
        before the square root.

    The (out, in)·(in, r) product ``W Aᵀ`` runs in the wider of W's and A's dtypes (fp32
    accumulation inside the GEMM): float32 adapters on a bfloat16 W are not rounded to
    bfloat16. Everything after it runs in at least float32.
    """
    check_weight_norm_inputs(weight, lora_A, lora_B)
    weight, lora_A, lora_B = weight.detach(), lora_A.detach(), lora_B.detach()
    if weight_sq_norm is None:
        weight_sq_norm = weight_row_sq_norm(weight)
    elif weight_sq_norm.shape != (weight.shape[0],):
        raise ValueError(
            f"weight_sq_norm must be (out,) = ({weight.shape[0]},), "
            f"got {tuple(weight_sq_norm.shape)}"
        )
    product_dtype = torch.promote_types(weight.dtype, lora_A.dtype)
    weight_a = weight.to(product_dtype) @ lora_A.to(product_dtype).T  # (out, r)
    return factored_weight_norm(weight_a, weight_sq_norm, lora_A, lora_B, scaling)


def factored_weight_norm(
    weight_a: Tensor,
    weight_sq_norm: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
) -> Tensor:
    """``n_i = ‖W_i + s·(B A)_i‖₂`` from the products a caller already has, never from W itself:
    ``n_i² = ‖W_i‖² + 2s·⟨(W Aᵀ)_i, B_i⟩ + s²·B_i (A Aᵀ) B_iᵀ``.

    Args:
        weight_a: ``W Aᵀ`` (out, r), however W is stored (a quantized base computes it in
            row chunks).
        weight_sq_norm: ``‖W_i‖²`` (out,).
        lora_A: A (r, in).
        lora_B: B (out, r).
        scaling: s.

    Returns:
        n (out,), detached, in at least float32 (the wider of ``weight_a``'s and A's);
        squared terms are clamped at 0 before the root.
    """
    dtype = torch.promote_types(norm_dtype(weight_a.dtype), norm_dtype(lora_A.dtype))
    a = lora_A.detach().to(dtype)
    b = lora_B.detach().to(dtype)
    # 2s·⟨B_i, (W Aᵀ)_i + (s/2)·(B A Aᵀ)_i⟩ = 2s⟨(W Aᵀ)_i, B_i⟩ + s²·B_i (A Aᵀ) B_iᵀ
    half_quadratic = torch.addmm(weight_a.detach().to(dtype), b, a @ a.T, alpha=0.5 * scaling)
    sq_norm = torch.linalg.vecdot(b, half_quadratic).mul_(2.0 * scaling)
    sq_norm += weight_sq_norm.to(dtype)
    return sq_norm.clamp_min_(0.0).sqrt_()
