"""How a backend runs under autograd: one op family, dispatched through a table.

Two ways in, one contract (``peft_kernels.contract``) behind both:

- ``adapter_linear`` (eager): a plain ``torch.autograd.Function`` around the backend's forward
  and backward, or, when nothing needs a gradient, the backend's forward alone. No
  ``torch.library`` dispatch on the way: small calls (decoding) pay microseconds, not 0.1 ms.
- ``peft_kernels::adapter_linear`` / ``adapter_linear_backward`` (under ``torch.compile``):
  ``torch.library`` custom ops with fake implementations and an autograd registration, so that
  ``torch.compile(fullgraph=True)`` traces them without graph breaks.

``BACKENDS`` maps a backend name to a loader of its module (triton is imported on first use).

Saved for backward, parameters aside: ``x``, ``u`` (M, r) and the dropout state (the torch
path's bool mask, the triton path's 8-byte seed) when dropout is on. DoRA adds the norm (out,)
and what its backend asks for ``grad_m``: the output y itself (torch, no dropout: the storage
its consumer usually saves anyway) or the pre-scale output base (M, out). Never an out×in
tensor and never ``dropout(x)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor

from peft_kernels.contract import Grads, Saved, empty, present

_NAMESPACE = "peft_kernels"


def _torch_backend() -> ModuleType:
    from peft_kernels import torch_linear

    return torch_linear


def _triton_backend() -> ModuleType:
    from peft_kernels import triton_linear  # imported on first use: triton is optional

    return triton_linear


BACKENDS: dict[str, Callable[[], ModuleType]] = {"torch": _torch_backend, "triton": _triton_backend}


@functools.cache
def backend_module(name: str) -> ModuleType:
    """The module implementing ``peft_kernels.contract`` for backend ``name``."""
    return BACKENDS[name]()


def _saved(inputs: tuple, y: Tensor, u: Tensor, state: Tensor | None, base: Tensor | None) -> tuple:
    """The tensors to save, in ``Saved`` order (Nones kept: ``save_for_backward`` takes them).

    ``state`` and ``base`` may be the empty tensors that stand for None in the custom ops.
    """
    x, weight, bias, lora_A, lora_B, magnitude, weight_norm = inputs
    base = present(base)
    dora_out = None if magnitude is None else (y if base is None else base)
    return (x, weight, bias, lora_A, lora_B, magnitude, weight_norm, u, present(state), dora_out)


def _grads_in_input_order(grads, needs_grad_x: bool, needs_grad_bias: bool) -> tuple:
    """(grad_x, None for W, grad_bias, grad_A, grad_B, grad_m, None for n)."""
    return (
        grads.x if needs_grad_x else None,
        None,
        grads.bias if needs_grad_bias else None,
        grads.lora_A,
        grads.lora_B,
        grads.magnitude,
        None,
    )


# ---------------------------------------------------------------------------------------------
# Eager: an autograd.Function, or the bare forward when no gradient is needed
# ---------------------------------------------------------------------------------------------


class _AdapterLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, weight_norm, options):
        backend, scaling, dropout_p, seed = options
        inputs = (x, weight, bias, lora_A, lora_B, magnitude, weight_norm)
        out = backend.forward(*inputs, scaling=scaling, dropout_p=dropout_p, seed=seed)
        ctx.save_for_backward(*_saved(inputs, *out))
        ctx.backend, ctx.scaling, ctx.dropout_p = backend, scaling, dropout_p
        return out.y

    @staticmethod
    def backward(ctx, grad_y):
        needs_grad_x, needs_grad_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        grads = ctx.backend.backward(
            grad_y.contiguous(),
            Saved(*ctx.saved_tensors),
            scaling=ctx.scaling,
            dropout_p=ctx.dropout_p,
            needs_grad_x=needs_grad_x,
            needs_grad_bias=needs_grad_bias,
        )
        return (*_grads_in_input_order(grads, needs_grad_x, needs_grad_bias), None)


def adapter_linear(
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
    backend: str,
) -> Tensor:
    """y (M, out) of the adapter layer on ``backend`` ("torch" | "triton"), x (M, in).

    Under ``torch.compile`` the custom ops run (traceable); otherwise the backend is called
    directly, through an ``autograd.Function`` only when some input requires grad.
    """
    if torch.compiler.is_compiling():
        return adapter_linear_op(
            x,
            weight,
            bias,
            lora_A,
            lora_B,
            magnitude,
            weight_norm,
            float(scaling),
            float(dropout_p),
            seed,
            backend,
        )[0]
    impl = backend_module(backend)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad
        or lora_A.requires_grad
        or lora_B.requires_grad
        or (bias is not None and bias.requires_grad)
        or (magnitude is not None and magnitude.requires_grad)
    )
    if not needs_grad:
        return impl.forward(
            x, weight, bias, lora_A, lora_B, magnitude, weight_norm,
            scaling=scaling, dropout_p=dropout_p, seed=seed,
        ).y  # fmt: skip
    options = (impl, scaling, dropout_p, seed)
    return _AdapterLinear.apply(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, options)


# ---------------------------------------------------------------------------------------------
# Traceable: torch.library custom ops (what torch.compile sees)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op(f"{_NAMESPACE}::adapter_linear", mutates_args=())
def adapter_linear_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor | None,
    weight_norm: Tensor | None,
    scaling: float,
    dropout_p: float,
    seed: Tensor | None,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, u, dropout_state, base)`` as ``contract.Forward`` (base empty if unneeded)."""
    impl = backend_module(backend)
    out = impl.forward(
        x, weight, bias, lora_A, lora_B, magnitude, weight_norm,
        scaling=scaling, dropout_p=dropout_p, seed=seed,
    )  # fmt: skip
    # custom ops return no None (empty tensors stand for it) and none of their inputs (the
    # dropout state may be the seed itself)
    state = out.dropout_state
    if state is None:
        state = empty(x, impl.dropout_state_spec(tuple(x.shape), dropout_p)[1])
    elif state is seed:
        state = state.clone()
    return out.y, out.u, state, empty(x) if out.base is None else out.base


@adapter_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p, seed, backend):
    rows, out_features = x.shape[0], weight.shape[0]
    impl = backend_module(backend)
    state_shape, state_dtype = impl.dropout_state_spec(tuple(x.shape), dropout_p)
    keeps_base = magnitude is not None and impl.dora_keeps_base(dropout_p, x.dtype, lora_A.dtype)
    return (
        x.new_empty(rows, out_features),
        x.new_empty(rows, lora_A.shape[0], dtype=lora_A.dtype),
        x.new_empty(state_shape, dtype=state_dtype),
        x.new_empty((rows, out_features) if keeps_base else (0,)),
    )


@torch.library.custom_op(f"{_NAMESPACE}::adapter_linear_backward", mutates_args=())
def adapter_linear_backward_op(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor | None,
    weight_norm: Tensor | None,
    u: Tensor,
    dropout_state: Tensor | None,
    dora_out: Tensor | None,
    scaling: float,
    dropout_p: float,
    backend: str,
    needs_grad_x: bool,
    needs_grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(grad_x, grad_A, grad_B, grad_m, grad_bias)``; empty where not needed or defined."""
    saved = Saved(
        x, weight, bias, lora_A, lora_B, magnitude, weight_norm, u, dropout_state, dora_out
    )
    grads = backend_module(backend).backward(
        grad_y.contiguous(),
        saved,
        scaling=scaling,
        dropout_p=dropout_p,
        needs_grad_x=needs_grad_x,
        needs_grad_bias=needs_grad_bias,
    )
    return tuple(empty(x) if g is None else g for g in grads)


@adapter_linear_backward_op.register_fake
def _(
    grad_y,
    x,
    weight,
    bias,
    lora_A,
    lora_B,
    magnitude,
    weight_norm,
    u,
    dropout_state,
    dora_out,
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
        x.new_empty(0) if magnitude is None else torch.empty_like(magnitude),
        x.new_empty(weight.shape[0]) if needs_grad_bias else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output) -> None:
    *tensors, scaling, dropout_p, _seed, backend = inputs
    ctx.save_for_backward(*_saved(tuple(tensors), *output))
    ctx.scaling, ctx.dropout_p, ctx.backend = scaling, dropout_p, backend
    ctx.dora = tensors[5] is not None


def _backward(ctx, grad_y, _grad_u, _grad_state, _grad_base):
    needs_grad_x, needs_grad_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    grads = adapter_linear_backward_op(
        grad_y,
        *ctx.saved_tensors,
        ctx.scaling,
        ctx.dropout_p,
        ctx.backend,
        needs_grad_x,
        needs_grad_bias,
    )
    grads = Grads(*grads)
    if not ctx.dora:  # LoRA: no magnitude, its slot holds an empty tensor
        grads = grads._replace(magnitude=None)
    return (*_grads_in_input_order(grads, needs_grad_x, needs_grad_bias), None, None, None, None)


adapter_linear_op.register_autograd(_backward, setup_context=_setup_context)
