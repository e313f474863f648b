"""Input checks shared by the public ops: one clear error per problem, raised before any work."""

from __future__ import annotations

import math

import torch
from torch import Tensor

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# (x dtype, adapter dtype) pairs allowed: the adapters in x's dtype or a wider one
_ADAPTER_DTYPES = {
    (x, adapter)
    for x in _FLOATING
    for adapter in _FLOATING
    if torch.promote_types(x, adapter) == adapter
}


def _all_fine(x, weight, bias, lora_A, lora_B, scaling, dropout_p, magnitude) -> bool:
    """True only if every check of ``check_adapter_inputs`` passes, in a few microseconds.

    The common case of every call (a decoding step runs this 200 times per token); anything it
    does not recognise sends the caller to the detailed checks, which name the problem.
    """
    try:
        if not (
            isinstance(x, Tensor)
            and isinstance(weight, Tensor)
            and isinstance(lora_A, Tensor)
            and isinstance(lora_B, Tensor)
        ):
            return False
        dtype, adapter_dtype, device = x.dtype, lora_A.dtype, x.device
        out_features, in_features = weight.shape
        rank, a_in = lora_A.shape
        fine = (
            (dtype, adapter_dtype) in _ADAPTER_DTYPES
            and weight.dtype == dtype
            and lora_B.dtype == adapter_dtype
            and x.shape[-1] == in_features == a_in
            and rank > 0
            and lora_B.shape == (out_features, rank)
            and not weight.requires_grad
            and weight.device == device
            and lora_A.device == device
            and lora_B.device == device
            and 0.0 <= dropout_p < 1.0
            and math.isfinite(scaling)
        )
        if fine and bias is not None:
            fine = (
                isinstance(bias, Tensor)
                and bias.dtype == dtype
                and bias.shape == (out_features,)
                and bias.device == device
            )
        if fine and magnitude is not None:
            fine = (
                isinstance(magnitude, Tensor)
                and magnitude.dtype == adapter_dtype
                and magnitude.shape == (out_features,)
                and magnitude.device == device
            )
        return fine
    except (AttributeError, TypeError, ValueError, IndexError):
        return False


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
    """Check the arguments of ``lora_linear`` / ``dora_linear``.

    Dtypes: ``x``, ``weight``, ``bias`` share one; ``lora_A``, ``lora_B``, ``magnitude`` share
    another, equal to it or wider.

    Raises:
        TypeError: a non-tensor argument, a non-floating ``x``, or mismatched dtypes.
        ValueError: mismatched shapes, ``r == 0``, tensors on different devices, a ``weight``
            that requires grad, or ``dropout_p`` / ``scaling`` out of range.
    """
    if not _all_fine(x, weight, bias, lora_A, lora_B, scaling, dropout_p, magnitude):
        _name_the_problem(x, weight, bias, lora_A, lora_B, scaling, dropout_p, magnitude)


def _name_the_problem(x, weight, bias, lora_A, lora_B, scaling, dropout_p, magnitude) -> None:
    """The detailed checks of ``check_adapter_inputs``: raise naming the first problem."""
    base = {"x": x, "weight": weight}
    if bias is not None:
        base["bias"] = bias
    adapter = {"lora_A": lora_A, "lora_B": lora_B}
    if magnitude is not None:
        adapter["magnitude"] = magnitude
    named = base | adapter
    for name, tensor in named.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    for name, tensor in base.items():
        if tensor.dtype != x.dtype:
            raise TypeError(
                f"{name} has dtype {tensor.dtype} but x has {x.dtype}; cast them to one dtype"
            )
    adapter_dtype = lora_A.dtype
    for name, tensor in adapter.items():
        if tensor.dtype != adapter_dtype:
            raise TypeError(
                f"{name} has dtype {tensor.dtype} but lora_A has {adapter_dtype}; the adapter "
                "tensors share one dtype"
            )
    if not adapter_dtype.is_floating_point or (
        torch.promote_types(x.dtype, adapter_dtype) != adapter_dtype
    ):
        raise TypeError(
            f"the adapters have dtype {adapter_dtype}, narrower than x's {x.dtype}; they must "
            "have x's dtype or a wider one (e.g. float32 adapters on a bfloat16 base)"
        )
    for name, tensor in named.items():
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}")

    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., in_features)")
    for name in ("weight", "lora_A", "lora_B"):
        if named[name].dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(named[name].shape)}")
    out_features, in_features = weight.shape
    rank = lora_A.shape[0]
    if x.shape[-1] != in_features:
        raise ValueError(
            f"x has {x.shape[-1]} features in its last dimension but weight {tuple(weight.shape)} "
            f"expects in_features={in_features}"
        )
    if rank == 0:
        raise ValueError("rank r must be >= 1, but lora_A has 0 rows")
    if lora_A.shape[1] != in_features:
        raise ValueError(
            f"lora_A must be (r, in_features) = (r, {in_features}), got {tuple(lora_A.shape)}"
        )
    if tuple(lora_B.shape) != (out_features, rank):
        raise ValueError(
            f"lora_B must be (out_features, r) = ({out_features}, {rank}), "
            f"got {tuple(lora_B.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(
            f"bias must be (out_features,) = ({out_features},), got {tuple(bias.shape)}"
        )
    if magnitude is not None and tuple(magnitude.shape) != (out_features,):
        raise ValueError(
            f"magnitude must be (out_features,) = ({out_features},), got {tuple(magnitude.shape)}"
        )
    check_frozen_and_scalars(weight, scaling, dropout_p)


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
