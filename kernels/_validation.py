"""Input checks shared by the public ops: one clear error per problem, raised before any work."""

from __future__ import annotations

import math

from torch import Tensor


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

    Raises:
        TypeError: a non-tensor argument, a non-floating ``x``, or mismatched dtypes.
        ValueError: mismatched shapes, ``r == 0``, tensors on different devices, a ``weight``
            that requires grad, or ``dropout_p`` / ``scaling`` out of range.
    """
    named = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    if bias is not None:
        named["bias"] = bias
    if magnitude is not None:
        named["magnitude"] = magnitude
    for name, tensor in named.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    for name, tensor in named.items():
        if tensor.dtype != x.dtype:
            raise TypeError(
                f"{name} has dtype {tensor.dtype} but x has {x.dtype}; cast them to one dtype"
            )
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
