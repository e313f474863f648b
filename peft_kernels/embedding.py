"""LoRA and DoRA on embeddings (``nn.Embedding``), with plain autograd torch ops.

Shapes, as peft's ``lora.Embedding`` holds them (V = vocabulary, d = embedding dimension):
``ids`` (...) integer; ``weight`` W (V, d), frozen; ``lora_A`` A (r, V); ``lora_B`` B (d, r);
``magnitude`` m (d,) (DoRA).

LoRA: ``y = W[ids] + s·Aᵀ[ids] Bᵀ``: the update of W is ``s·Aᵀ Bᵀ`` (V, d), and row ``i`` of
``Aᵀ`` (column ``i`` of A, r numbers) is *gathered* per id (``F.embedding`` on the view ``Aᵀ``):
no one-hot matrix, no V×d matrix; the extra activation is (..., r). Gradients reach only the
gathered columns of A (dense in A's storage, zero elsewhere; ``padding_idx`` and
``scale_grad_by_freq`` act on them as on an embedding's weight). A's gradient is always dense:
W is frozen, so a base embedding's ``sparse`` flag has nothing to act on (peft passes it to
the adapter lookup, whose backward then fails on the transposed view).

DoRA: the magnitude is per embedding dimension, as peft's ``DoraEmbeddingLayer`` has it:
``n_j = ‖W[:, j] + s·(Aᵀ Bᵀ)[:, j]‖`` over the vocabulary, ``y = (m/n) ⊙ (W[ids] + s·Aᵀ[ids] Bᵀ)``.
The norm is ``dora_weight_norm`` of ``Wᵀ`` (d, V) with A, B as they are (``Wᵀ + s·B A``), so no
V×d matrix is built for it either. There is no dropout on embeddings (peft applies none).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from peft_kernels.norm import dora_weight_norm, norm_dtype, weight_row_sq_norm


def _check_inputs(
    ids: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    magnitude: Tensor | None = None,
) -> None:
    named = {"ids": ids, "weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    if magnitude is not None:
        named["magnitude"] = magnitude
    for name, tensor in named.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device != weight.device:
            raise ValueError(f"{name} is on {tensor.device} but weight is on {weight.device}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"ids must be an int64 or int32 tensor, got dtype {ids.dtype}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got dtype {weight.dtype}")
    adapters = {k: v for k, v in named.items() if k not in ("ids", "weight")}
    for name, tensor in adapters.items():
        if tensor.dtype != lora_A.dtype or not tensor.is_floating_point():
            raise TypeError(
                f"{name} has dtype {tensor.dtype}; lora_A, lora_B and magnitude must share one "
                f"floating dtype (lora_A has {lora_A.dtype})"
            )
    if weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError("weight, lora_A and lora_B must be 2-D: (V, d), (r, V), (d, r)")
    vocab, dim = weight.shape
    rank = lora_A.shape[0]
    if rank == 0:
        raise ValueError("rank r must be >= 1, but lora_A has 0 rows")
    if lora_A.shape[1] != vocab:
        raise ValueError(f"lora_A must be (r, V) = (r, {vocab}), got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (dim, rank):
        raise ValueError(f"lora_B must be (d, r) = ({dim}, {rank}), got {tuple(lora_B.shape)}")
    if magnitude is not None and tuple(magnitude.shape) != (dim,):
        raise ValueError(f"magnitude must be (d,) = ({dim},), got {tuple(magnitude.shape)}")
    if weight.requires_grad:
        raise ValueError(
            "weight requires grad, but the base weight is frozen in these ops: call "
            "weight.requires_grad_(False) (train lora_A, lora_B and magnitude instead)"
        )
    if not math.isfinite(float(scaling)):
        raise ValueError(f"scaling must be a finite number, got {scaling}")


def _lookups(ids, weight, lora_A, lora_B, padding_idx, scale_grad_by_freq):
    """``(W[ids], Aᵀ[ids] Bᵀ)``: W's lookup in W's dtype, the adapter's in A's."""
    base = F.embedding(ids, weight, padding_idx)  # (..., d); W is frozen
    after_A = F.embedding(ids, lora_A.T, padding_idx, scale_grad_by_freq=scale_grad_by_freq)
    return base, after_A @ lora_B.T  # (..., d)


def lora_embedding(
    ids: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    *,
    padding_idx: int | None = None,
    scale_grad_by_freq: bool = False,
) -> Tensor:
    """LoRA embedding: ``y = W[ids] + scaling · Aᵀ[ids] Bᵀ``.

    Args:
        ids: (...) integer token ids in [0, V).
        weight: W (V, d), frozen (must not require grad).
        lora_A: A (r, V); its column ``i`` is gathered for id ``i``.
        lora_B: B (d, r).
        scaling: s, ``lora_alpha / r`` (rsLoRA: ``lora_alpha / sqrt(r)``).
        padding_idx, scale_grad_by_freq: the base embedding's, applied to the adapter's lookup
            as to an embedding weight (``padding_idx``'s column of A gets no gradient).

    Returns:
        y (..., d) in W's dtype; the adapter runs in A's dtype and the sum in the wider of the
        two (as peft: fp32 adapters on a bf16 W add in fp32, then round once).
    """
    _check_inputs(ids, weight, lora_A, lora_B, scaling)
    base, delta = _lookups(ids, weight, lora_A, lora_B, padding_idx, scale_grad_by_freq)
    return (base + delta * scaling).to(weight.dtype)


def dora_embedding(
    ids: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    scaling: float,
    *,
    padding_idx: int | None = None,
    scale_grad_by_freq: bool = False,
    weight_sq_norm: Tensor | None = None,
) -> Tensor:
    """DoRA embedding: ``y = (m/n) ⊙ (W[ids] + scaling · Aᵀ[ids] Bᵀ)``, n (d,) from
    ``embedding_dora_weight_norm``, a constant in backward (DoRA §4.3).

    Args:
        ids, weight, lora_A, lora_B, scaling, padding_idx, scale_grad_by_freq: as in
            ``lora_embedding``.
        magnitude: m (d,).
        weight_sq_norm: optional cached ``‖W[:, j]‖²`` (d,) (``embedding_weight_sq_norm``).

    Returns:
        y (..., d) in W's dtype.
    """
    _check_inputs(ids, weight, lora_A, lora_B, scaling, magnitude)
    norm = embedding_dora_weight_norm(weight, lora_A, lora_B, scaling, weight_sq_norm)
    base, delta = _lookups(ids, weight, lora_A, lora_B, padding_idx, scale_grad_by_freq)
    scale = magnitude.to(norm.dtype) / norm
    return (scale * (base + delta * scaling)).to(weight.dtype)


def embedding_weight_sq_norm(weight: Tensor) -> Tensor:
    """``‖W[:, j]‖²`` per embedding dimension (d,), in at least float32. Cacheable: W is frozen."""
    return weight_row_sq_norm(weight.T)


def embedding_dora_weight_norm(
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    weight_sq_norm: Tensor | None = None,
) -> Tensor:
    """``n_j = ‖W[:, j] + s·(Aᵀ Bᵀ)[:, j]‖₂`` (d,), detached, in at least float32: the row norms
    of ``Wᵀ + s·B A`` (``dora_weight_norm`` on the view ``Wᵀ``; one (d, V)·(V, r) product, no
    V×d matrix).

    Args:
        weight: W (V, d). lora_A: A (r, V). lora_B: B (d, r). scaling: s.
        weight_sq_norm: optional cached ``‖W[:, j]‖²`` (d,).
    """
    return dora_weight_norm(weight.T, lora_A, lora_B, scaling, weight_sq_norm)


def embedding_delta_weight(lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """The update ``s·Aᵀ Bᵀ`` (V, d) in at least float32 (for merging into W)."""
    dtype = norm_dtype(lora_A.dtype)
    return (lora_A.to(dtype).T @ lora_B.to(dtype).T) * scaling
