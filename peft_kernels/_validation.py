"""Input checks shared by the public ops: one clear error per problem, raised before any work."""

from __future__ import annotations

import math
from typing import NoReturn

import torch
from torch import Tensor

_FLOATING = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))
# (x dtype, adapter dtype) pairs allowed: the adapters in x's dtype or a wider one
_ADAPTER_DTYPES = {
    (x, adapter)
    for x in _FLOATING
    for adapter in _FLOATING
    if torch.promote_types(x, adapter) == adapter
}


def check_adapter_inputs(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float,
    magnitude: Tensor | None = None,
) -> None:
    """Check the arguments of ``lora_linear`` / ``dora_linear``; raise naming the first problem.

    Dtypes: ``x``, ``weight``, ``bias`` share one; ``lora_A``, ``lora_B``, ``magnitude`` share
    another, equal to it or wider. Shapes: x (..., in), weight (out, in), bias (out,),
    lora_A (r, in) with r >= 1, lora_B (out, r), magnitude (out,); all on x's device.

    One flat sequence of cheap tests (a decoding step runs this for every adapted layer, once
    per token): the messages are built only when a test fails.

    Raises:
        TypeError: a non-tensor argument, a non-floating ``x``, or mismatched dtypes.
        ValueError: mismatched shapes, ``r == 0``, tensors on different devices, a ``weight``
            that requires grad, or ``dropout_p`` / ``scaling`` out of range.
    """
    if not isinstance(x, Tensor):
        _not_a_tensor("x", x)
    if not isinstance(weight, Tensor):
        _not_a_tensor("weight", weight)
    if bias is not None and not isinstance(bias, Tensor):
        _not_a_tensor("bias", bias)
    if not isinstance(lora_A, Tensor):
        _not_a_tensor("lora_A", lora_A)
    if not isinstance(lora_B, Tensor):
        _not_a_tensor("lora_B", lora_B)
    if magnitude is not None and not isinstance(magnitude, Tensor):
        _not_a_tensor("magnitude", magnitude)

    dtype, adapter_dtype, device = x.dtype, lora_A.dtype, x.device
    if dtype not in _FLOATING and not dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got dtype {dtype}")
    if weight.dtype != dtype:
        _dtype_mismatch("weight", weight, "x", dtype, "cast them to one dtype")
    if bias is not None and bias.dtype != dtype:
        _dtype_mismatch("bias", bias, "x", dtype, "cast them to one dtype")
    if lora_B.dtype != adapter_dtype:
        _dtype_mismatch("lora_B", lora_B, "lora_A", adapter_dtype, _ADAPTERS_SHARE)
    if magnitude is not None and magnitude.dtype != adapter_dtype:
        _dtype_mismatch("magnitude", magnitude, "lora_A", adapter_dtype, _ADAPTERS_SHARE)
    if (dtype, adapter_dtype) not in _ADAPTER_DTYPES and not (
        adapter_dtype.is_floating_point
        and torch.promote_types(dtype, adapter_dtype) == adapter_dtype
    ):
        raise TypeError(
            f"the adapters have dtype {adapter_dtype}, narrower than x's {dtype}; they must "
            "have x's dtype or a wider one (e.g. float32 adapters on a bfloat16 base)"
        )
    if weight.device != device:
        _elsewhere("weight", weight, device)
    if bias is not None and bias.device != device:
        _elsewhere("bias", bias, device)
    if lora_A.device != device:
        _elsewhere("lora_A", lora_A, device)
    if lora_B.device != device:
        _elsewhere("lora_B", lora_B, device)
    if magnitude is not None and magnitude.device != device:
        _elsewhere("magnitude", magnitude, device)

    try:  # unpacking checks the dimensions; on failure, name the first tensor at fault
        x_features = x.shape[-1]
        out_features, in_features = weight.shape
        rank, a_in_features = lora_A.shape
        b_out_features, b_rank = lora_B.shape
    except (IndexError, ValueError):
        if x.ndim < 1:
            raise ValueError("x must have at least one dimension (..., in_features)") from None
        for name, tensor in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
            if tensor.ndim != 2:
                raise ValueError(f"{name} must be 2-D, got shape {tuple(tensor.shape)}") from None
        raise
    if x_features != in_features:
        raise ValueError(
            f"x has {x_features} features in its last dimension but weight {tuple(weight.shape)} "
            f"expects in_features={in_features}"
        )
    if rank == 0:
        raise ValueError("rank r must be >= 1, but lora_A has 0 rows")
    if a_in_features != in_features:
        raise ValueError(
            f"lora_A must be (r, in_features) = (r, {in_features}), got {tuple(lora_A.shape)}"
        )
    if b_out_features != out_features or b_rank != rank:
        raise ValueError(
            f"lora_B must be (out_features, r) = ({out_features}, {rank}), "
            f"got {tuple(lora_B.shape)}"
        )
    if bias is not None and bias.shape != (out_features,):
        _not_out_features("bias", bias, out_features)
    if magnitude is not None and magnitude.shape != (out_features,):
        _not_out_features("magnitude", magnitude, out_features)
    check_frozen_and_scalars(weight, scaling, dropout_p)


_ADAPTERS_SHARE = "the adapter tensors share one dtype"


def _not_a_tensor(name: str, value) -> NoReturn:
    raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _elsewhere(name: str, tensor: Tensor, device: torch.device) -> NoReturn:
    raise ValueError(f"{name} is on {tensor.device} but x is on {device}")


def _not_out_features(name: str, tensor: Tensor, out_features: int) -> NoReturn:
    raise ValueError(
        f"{name} must be (out_features,) = ({out_features},), got {tuple(tensor.shape)}"
    )


def _dtype_mismatch(
    name: str, tensor: Tensor, like: str, dtype: torch.dtype, hint: str
) -> NoReturn:
    raise TypeError(f"{name} has dtype {tensor.dtype} but {like} has {dtype}; {hint}")


def check_frozen_and_scalars(weight: Tensor, scaling: float, dropout_p: float) -> None:
    """A frozen ``weight``, ``dropout_p`` in [0, 1) and a finite ``scaling``, else ``ValueError``
    (the last checks of ``check_adapter_inputs``, shared with the convolution ops).
    """
    if weight.requires_grad:
        raise ValueError(
            "weight requires grad, but the base weight is frozen in these ops: call "
            "weight.requires_grad_(False) (train lora_A, lora_B, magnitude and bias instead)"
        )
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if not math.isfinite(float(scaling)):
        raise ValueError(f"scaling must be a finite number, got {scaling}")


def check_weight_norm_inputs(weight: Tensor, lora_A: Tensor, lora_B: Tensor) -> None:
    """Shape checks for ``dora_weight_norm``."""
    if weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError("weight, lora_A and lora_B must be 2-D")
    if lora_A.shape[1] != weight.shape[1] or lora_B.shape != (weight.shape[0], lora_A.shape[0]):
        raise ValueError(
            f"shapes do not fit: weight {tuple(weight.shape)}, lora_A {tuple(lora_A.shape)}, "
            f"lora_B {tuple(lora_B.shape)}; expected (out, in), (r, in), (out, r)"
        )
    if not (weight.is_floating_point() and lora_A.is_floating_point()):
        raise TypeError("weight and lora_A/lora_B must be floating-point tensors")
    if lora_A.shape[0] == 0:
        raise ValueError("rank r must be >= 1, but lora_A has 0 rows")
