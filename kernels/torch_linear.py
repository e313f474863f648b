"""PyTorch backend: hand-written LoRA and DoRA forward and backward (the CPU fallback).

Lean by construction: in-place ``addmm_`` accumulation, no out×in temporary ever, and no
M×out temporary besides the output (DoRA keeps its pre-scale output ``base`` for ``grad_m``
and reuses one M×out buffer in backward). Dropout draws a bool keep-mask from a seeded
generator; the mask (1 byte per element of x) is what backward keeps, never ``dropout(x)``.

All functions take 2-D, contiguous ``x`` (M, in), ``weight`` W (out, in), ``bias`` (out,)
or None, ``lora_A`` A (r, in), ``lora_B`` B (out, r), ``magnitude`` m (out,) and
``weight_norm`` n (out,); ``seed`` is an int64 tensor (1,) when ``dropout_p > 0`` else None.
"""

from __future__ import annotations

import torch
from torch import Tensor


def keep_mask(seed: Tensor, shape: tuple[int, int], dropout_p: float) -> Tensor:
    """Bool keep-mask of ``shape``, True with probability ``1 − p``, from a generator seeded by
    ``seed``."""
    generator = torch.Generator(device=seed.device)
    generator.manual_seed(int(seed.item()))
    return torch.rand(shape, generator=generator, device=seed.device) >= dropout_p


def _dropped(x: Tensor, keep: Tensor | None, dropout_p: float) -> Tensor:
    """``x̃ = x ⊙ keep / (1 − p)`` (a new M×in tensor), or ``x`` itself without dropout."""
    if keep is None:
        return x
    return x.mul(keep).mul_(1.0 / (1.0 - dropout_p))


def _empty_mask(x: Tensor) -> Tensor:
    return x.new_empty(0, dtype=torch.bool)


def lora_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float,
    seed: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``y = x Wᵀ + b + s·u Bᵀ`` with ``u = x̃ Aᵀ``.

    Returns:
        y (M, out); u (M, r), saved for ``grad_B``; keep (M, in) bool, or an empty tensor
        without dropout.
    """
    keep = keep_mask(seed, tuple(x.shape), dropout_p) if seed is not None else None
    u = _dropped(x, keep, dropout_p) @ lora_A.T
    y = torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T
    y.addmm_(u, lora_B.T, alpha=scaling)
    return y, u, keep if keep is not None else _empty_mask(x)


def _adapter_grads(
    grad: Tensor,
    x: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    u: Tensor,
    keep: Tensor | None,
    scaling: float,
    dropout_p: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """From the gradient ``grad`` (M, out) reaching ``s·u Bᵀ``: ``(gB, grad_A, grad_B)``.

    ``gB = grad B`` (M, r), ``grad_B = s·gradᵀ u`` (out, r), ``grad_A = s·gBᵀ x̃`` (r, in).
    """
    grad_b_proj = grad @ lora_B
    grad_lora_B = (grad.T @ u).mul_(scaling)
    grad_lora_A = (grad_b_proj.T @ _dropped(x, keep, dropout_p)).mul_(scaling)
    return grad_b_proj, grad_lora_A, grad_lora_B


def lora_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    u: Tensor,
    keep: Tensor | None,
    scaling: float,
    dropout_p: float,
    needs_grad_x: bool,
    needs_grad_bias: bool,
) -> tuple[Tensor | None, Tensor, Tensor, Tensor | None]:
    """Gradients of ``lora_forward``: ``(grad_x, grad_A, grad_B, grad_bias)``.

    ``grad_x = g W + s·(g B A) ⊙ keep/(1−p)``, ``grad_bias = Σ_M g``; None where not needed.
    """
    grad_b_proj, grad_lora_A, grad_lora_B = _adapter_grads(
        grad_y, x, lora_A, lora_B, u, keep, scaling, dropout_p
    )
    grad_x = None
    if needs_grad_x:
        grad_x = grad_y @ weight
        if keep is None:
            grad_x.addmm_(grad_b_proj, lora_A, alpha=scaling)
        else:
            grad_x.add_((grad_b_proj @ lora_A).mul_(keep), alpha=scaling / (1.0 - dropout_p))
    grad_bias = grad_y.sum(0) if needs_grad_bias else None
    return grad_x, grad_lora_A, grad_lora_B, grad_bias


def _column_scale(magnitude: Tensor, weight_norm: Tensor, dtype: torch.dtype) -> Tensor:
    """DoRA's ``c = m / n`` (out,), computed in the norm's precision, returned in ``dtype``."""
    return (magnitude.to(weight_norm.dtype) / weight_norm).to(dtype)


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
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """DoRA forward with ``c = m / n``.

    Without dropout: ``base = x Wᵀ + s·u Bᵀ``, ``y = c ⊙ base + b`` (no GEMM beyond LoRA's).
    With dropout (peft's definition): ``base = x̃ Wᵀ + s·u Bᵀ``, ``y = (x − x̃) Wᵀ + c ⊙ base + b``.

    Returns:
        y (M, out); u (M, r); keep (M, in) bool or empty; base (M, out), saved for ``grad_m``.
    """
    keep = keep_mask(seed, tuple(x.shape), dropout_p) if seed is not None else None
    x_dropped = _dropped(x, keep, dropout_p)
    u = x_dropped @ lora_A.T
    base = x_dropped @ weight.T
    base.addmm_(u, lora_B.T, alpha=scaling)
    column_scale = _column_scale(magnitude, weight_norm, x.dtype)
    if keep is None:
        y = torch.addcmul(bias, base, column_scale) if bias is not None else base * column_scale
    else:
        y = (
            torch.addmm(bias, x - x_dropped, weight.T)
            if bias is not None
            else (x - x_dropped) @ weight.T
        )
        y.addcmul_(base, column_scale)
    return y, u, keep if keep is not None else _empty_mask(x), base


def dora_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    weight_norm: Tensor,
    u: Tensor,
    keep: Tensor | None,
    base: Tensor,
    scaling: float,
    dropout_p: float,
    needs_grad_x: bool,
    needs_grad_bias: bool,
) -> tuple[Tensor | None, Tensor, Tensor, Tensor, Tensor | None]:
    """Gradients of ``dora_forward``: ``(grad_x, grad_A, grad_B, grad_magnitude, grad_bias)``.

    With ``G = g ⊙ c``: ``grad_m = Σ_M g ⊙ base / n``; the adapter grads are LoRA's with G;
    ``grad_x = G W + s·G B A`` without dropout, and with dropout
    ``grad_x = g W + [(G − g) W + s·G B A] ⊙ keep/(1−p)``.
    """
    # One M×out buffer serves twice: first g ⊙ base for grad_m, then G = g ⊙ c.
    buffer = torch.mul(grad_y, base)
    grad_magnitude = (buffer.sum(0).to(weight_norm.dtype) / weight_norm).to(magnitude.dtype)
    grad_scaled = torch.mul(grad_y, _column_scale(magnitude, weight_norm, grad_y.dtype), out=buffer)
    grad_b_proj, grad_lora_A, grad_lora_B = _adapter_grads(
        grad_scaled, x, lora_A, lora_B, u, keep, scaling, dropout_p
    )
    grad_x = None
    if needs_grad_x:
        if keep is None:
            grad_x = grad_scaled @ weight
            grad_x.addmm_(grad_b_proj, lora_A, alpha=scaling)
        else:
            masked = grad_scaled.sub_(grad_y) @ weight  # (G − g) W; the buffer is free now
            masked.addmm_(grad_b_proj, lora_A, alpha=scaling).mul_(keep)
            grad_x = grad_y @ weight
            grad_x.add_(masked, alpha=1.0 / (1.0 - dropout_p))
    grad_bias = grad_y.sum(0) if needs_grad_bias else None
    return grad_x, grad_lora_A, grad_lora_B, grad_magnitude, grad_bias
