"""Naive reference: the LoRA and DoRA layers written with plain autograd torch ops.

This is the "naive matmuls" baseline of the benchmarks and follows `peft`'s layer code
(``peft/tuners/lora/layer.py`` and ``dora.py``): DoRA builds the full out×in matrix
``W + s·B A`` to take its row norm, and autograd saves whatever it saves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
) -> Tensor:
    """``y = x Wᵀ + b + s·(dropout(x) Aᵀ) Bᵀ``. Shapes: x (..., in) -> y (..., out).

    Wider adapters (float32 on a bfloat16 base) take x cast to their dtype; the sum is cast
    back to x's dtype once, as peft does.
    """
    x_dropped = F.dropout(x, dropout_p, training).to(lora_A.dtype)
    lora = F.linear(F.linear(x_dropped, lora_A), lora_B) * scaling
    return (F.linear(x, weight, bias) + lora).to(x.dtype)


def dora_weight_norm_direct(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float
) -> Tensor:
    """Row norms ``‖W_i + s·(B A)_i‖₂`` (out,), materialising the out×in matrix as peft does."""
    return torch.linalg.vector_norm(weight + scaling * (lora_B @ lora_A), dim=1)


def dora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
) -> Tensor:
    """DoRA with the norm detached (DoRA paper §4.3), as `peft` defines it.

    Dropout off: ``y = c ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b`` with ``c = m / ‖W + sBA‖_row``.
    Wider adapters: the adapter branch and the DoRA scaling in their dtype, cast back once.
    Dropout on: ``y = x Wᵀ + b + (c − 1) ⊙ (x̃ Wᵀ) + c ⊙ s·(x̃ Aᵀ) Bᵀ``, ``x̃ = dropout(x)``.
    """
    wide = lora_A.dtype
    norm = dora_weight_norm_direct(weight.to(wide), lora_A, lora_B, scaling).detach()
    column_scale = magnitude / norm
    if training and dropout_p > 0:
        x_dropped = F.dropout(x, dropout_p, training)
        lora = F.linear(F.linear(x_dropped.to(wide), lora_A), lora_B) * scaling
        y = (
            F.linear(x, weight, bias)
            + (column_scale - 1) * F.linear(x_dropped, weight)
            + column_scale * lora
        )
        return y.to(x.dtype)
    lora = F.linear(F.linear(x.to(wide), lora_A), lora_B) * scaling
    y = column_scale * (F.linear(x, weight) + lora)
    return (y if bias is None else y + bias).to(x.dtype)


def adapter_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor | None,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
) -> Tensor:
    """``lora_linear`` (``magnitude`` None) or ``dora_linear``: the naive backend's layer."""
    if magnitude is None:
        return lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training)
    return dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, training)


def grouped_lora_delta(
    x: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: Tensor,
    offsets: Tensor,
    rows: Tensor | None = None,
) -> Tensor:
    """Segmented LoRA by a loop over the groups: ``δ_j = s_k·(x_o[j] A_kᵀ) B_kᵀ`` for ordered
    row j of group k (``x_o = x[rows]`` or x; group k = ``[offsets[k-1], offsets[k])``), 0 past
    ``offsets[-1]``. Shapes: x (N, in), A (K, r, in), B (K, out, r) -> δ (M, out) in x's dtype,
    computed in ``promote(x.dtype, A.dtype)``.
    """
    wide = torch.promote_types(x.dtype, lora_A.dtype)
    ordered = (x if rows is None else x[rows]).to(wide)
    pieces, start = [], 0
    for k, end in enumerate(offsets.tolist()):
        segment = ordered[start:end] @ lora_A[k].to(wide).T @ lora_B[k].to(wide).T
        pieces.append(segment * scaling[k].to(wide))
        start = end
    pieces.append(ordered.new_zeros(ordered.shape[0] - start, lora_B.shape[1]))
    return torch.cat(pieces).to(x.dtype)
