"""``torch.library`` registration of the LoRA and DoRA ops (torch and triton backends).

Each op is a pair of custom ops, forward and backward, with fake (meta) implementations so
that ``torch.compile(fullgraph=True)`` traces through them, and an autograd registration
whose backward calls the backward op. ``backend`` ("torch" | "triton") picks the launchers.

What is saved for backward (parameters aside): ``x``, ``u`` (M, r), the seed (int64, 1
element) or on the torch path the bool keep-mask when dropout is on; DoRA adds ``base``
(M, out) and the norm (out,). Never an out×in tensor and never ``dropout(x)``.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from kernels import torch_linear

_NAMESPACE = "lightning_peft"


def _launchers(backend: str) -> ModuleType:
    if backend == "triton":
        from kernels import triton_linear  # imported on first use: triton is optional

        return triton_linear
    return torch_linear


def _uses_mask(backend: str, dropout_p: float) -> bool:
    """The torch path keeps a bool mask for backward; the triton path regenerates it."""
    return backend == "torch" and dropout_p > 0


def _or_empty(tensor: Tensor | None, like: Tensor) -> Tensor:
    # Custom ops cannot return None: an empty tensor stands for "not computed".
    return tensor if tensor is not None else like.new_empty(0)


def _or_none(tensor: Tensor, needed: bool) -> Tensor | None:
    return tensor if needed else None


def _dropout_state(keep: Tensor, seed: Tensor | None, backend: str) -> tuple:
    """What backward needs to redo dropout: the torch path's mask, or the triton path's seed."""
    if backend == "triton":
        return None, seed
    return (keep if keep.numel() else None), None


# ---------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op(f"{_NAMESPACE}::lora_forward", mutates_args=())
def lora_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float,
    seed: Tensor | None,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(y (M, out), u (M, r), keep)``; keep is the torch path's mask or empty."""
    if backend == "triton":
        y, u = _launchers(backend).lora_forward(
            x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed
        )
        return y, u, x.new_empty(0, dtype=torch.bool)
    return torch_linear.lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


@lora_forward.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
    keep_shape = x.shape if _uses_mask(backend, dropout_p) else (0,)
    return (
        x.new_empty(x.shape[0], weight.shape[0]),
        x.new_empty(x.shape[0], lora_A.shape[0]),
        x.new_empty(keep_shape, dtype=torch.bool),
    )


@torch.library.custom_op(f"{_NAMESPACE}::lora_backward", mutates_args=())
def lora_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    u: Tensor,
    keep: Tensor | None,
    seed: Tensor | None,
    scaling: float,
    dropout_p: float,
    backend: str,
    needs_grad_x: bool,
    needs_grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(grad_x, grad_A, grad_B, grad_bias)``; empty where not needed."""
    grad_y = grad_y.contiguous()
    if backend == "triton":
        grads = _launchers(backend).lora_backward(
            grad_y,
            x,
            weight,
            lora_A,
            lora_B,
            u,
            scaling,
            dropout_p,
            seed,
            needs_grad_x,
            needs_grad_bias,
        )
    else:
        grads = torch_linear.lora_backward(
            grad_y,
            x,
            weight,
            lora_A,
            lora_B,
            u,
            keep,
            scaling,
            dropout_p,
            needs_grad_x,
            needs_grad_bias,
        )
    grad_x, grad_lora_A, grad_lora_B, grad_bias = grads
    return _or_empty(grad_x, x), grad_lora_A, grad_lora_B, _or_empty(grad_bias, x)


@lora_backward.register_fake
def _(
    grad_y,
    x,
    weight,
    lora_A,
    lora_B,
    u,
    keep,
    seed,
    scaling,
    dropout_p,
    backend,
    needs_grad_x,
    needs_grad_bias,
):
    return (
        torch.empty_like(x) if needs_grad_x else x.new_empty(0),
        torch.empty_like(lora_A),
        torch.empty_like(lora_B),
        x.new_empty(weight.shape[0]) if needs_grad_bias else x.new_empty(0),
    )


def _lora_setup_context(ctx, inputs, output) -> None:
    x, weight, _bias, lora_A, lora_B, scaling, dropout_p, seed, backend = inputs
    _, u, keep = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, u, *_dropout_state(keep, seed, backend))
    ctx.scaling, ctx.dropout_p, ctx.backend = scaling, dropout_p, backend


def _lora_backward_autograd(ctx, grad_y, grad_u, grad_keep):
    x, weight, lora_A, lora_B, u, keep, seed = ctx.saved_tensors
    needs_grad_x, needs_grad_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    grad_x, grad_lora_A, grad_lora_B, grad_bias = lora_backward(
        grad_y,
        x,
        weight,
        lora_A,
        lora_B,
        u,
        keep,
        seed,
        ctx.scaling,
        ctx.dropout_p,
        ctx.backend,
        needs_grad_x,
        needs_grad_bias,
    )
    return (
        _or_none(grad_x, needs_grad_x),
        None,
        _or_none(grad_bias, needs_grad_bias),
        grad_lora_A,
        grad_lora_B,
        None,
        None,
        None,
        None,
    )


lora_forward.register_autograd(_lora_backward_autograd, setup_context=_lora_setup_context)


# ---------------------------------------------------------------------------------------------
# DoRA
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op(f"{_NAMESPACE}::dora_forward", mutates_args=())
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
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(y (M, out), u (M, r), keep, base (M, out))``; keep as in ``lora_forward``."""
    if backend == "triton":
        y, u, base = _launchers(backend).dora_forward(
            x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p, seed
        )
        return y, u, x.new_empty(0, dtype=torch.bool), base
    return torch_linear.dora_forward(
        x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p, seed
    )


@dora_forward.register_fake
def _(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p, seed, backend):
    keep_shape = x.shape if _uses_mask(backend, dropout_p) else (0,)
    return (
        x.new_empty(x.shape[0], weight.shape[0]),
        x.new_empty(x.shape[0], lora_A.shape[0]),
        x.new_empty(keep_shape, dtype=torch.bool),
        x.new_empty(x.shape[0], weight.shape[0]),
    )


@torch.library.custom_op(f"{_NAMESPACE}::dora_backward", mutates_args=())
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
    seed: Tensor | None,
    scaling: float,
    dropout_p: float,
    backend: str,
    needs_grad_x: bool,
    needs_grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(grad_x, grad_A, grad_B, grad_magnitude, grad_bias)``; empty where not needed."""
    grad_y = grad_y.contiguous()
    if backend == "triton":
        grads = _launchers(backend).dora_backward(
            grad_y,
            x,
            weight,
            lora_A,
            lora_B,
            magnitude,
            weight_norm,
            u,
            base,
            scaling,
            dropout_p,
            seed,
            needs_grad_x,
            needs_grad_bias,
        )
    else:
        grads = torch_linear.dora_backward(
            grad_y,
            x,
            weight,
            lora_A,
            lora_B,
            magnitude,
            weight_norm,
            u,
            keep,
            base,
            scaling,
            dropout_p,
            needs_grad_x,
            needs_grad_bias,
        )
    grad_x, grad_lora_A, grad_lora_B, grad_magnitude, grad_bias = grads
    return (_or_empty(grad_x, x), grad_lora_A, grad_lora_B, grad_magnitude, _or_empty(grad_bias, x))


@dora_backward.register_fake
def _(
    grad_y,
    x,
    weight,
    lora_A,
    lora_B,
    magnitude,
    weight_norm,
    u,
    keep,
    base,
    seed,
    scaling,
    dropout_p,
    backend,
    needs_grad_x,
    needs_grad_bias,
):
    return (
        torch.empty_like(x) if needs_grad_x else x.new_empty(0),
        torch.empty_like(lora_A),
        torch.empty_like(lora_B),
        torch.empty_like(magnitude),
        x.new_empty(weight.shape[0]) if needs_grad_bias else x.new_empty(0),
    )


def _dora_setup_context(ctx, inputs, output) -> None:
    x, weight, _bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p, seed, backend = (
        inputs
    )
    _, u, keep, base = output
    keep, seed = _dropout_state(keep, seed, backend)
    ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, weight_norm, u, keep, base, seed)
    ctx.scaling, ctx.dropout_p, ctx.backend = scaling, dropout_p, backend


def _dora_backward_autograd(ctx, grad_y, grad_u, grad_keep, grad_base):
    x, weight, lora_A, lora_B, magnitude, weight_norm, u, keep, base, seed = ctx.saved_tensors
    needs_grad_x, needs_grad_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    grad_x, grad_lora_A, grad_lora_B, grad_magnitude, grad_bias = dora_backward(
        grad_y,
        x,
        weight,
        lora_A,
        lora_B,
        magnitude,
        weight_norm,
        u,
        keep,
        base,
        seed,
        ctx.scaling,
        ctx.dropout_p,
        ctx.backend,
        needs_grad_x,
        needs_grad_bias,
    )
    return (
        _or_none(grad_x, needs_grad_x),
        None,
        _or_none(grad_bias, needs_grad_bias),
        grad_lora_A,
        grad_lora_B,
        grad_magnitude,
        None,
        None,
        None,
        None,
        None,
    )


dora_forward.register_autograd(_dora_backward_autograd, setup_context=_dora_setup_context)
