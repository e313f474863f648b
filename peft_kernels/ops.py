"""How a backend runs under autograd: ``adapter_linear``, one op for LoRA and DoRA.

Written once as forward / backward / fake functions over the backend contract
(``peft_kernels.contract``) and built by ``peft_kernels.dual_op`` into an eager
``autograd.Function`` (no ``torch.library`` dispatch: small calls pay microseconds) and the
custom ops ``peft_kernels::adapter_linear`` / ``adapter_linear_backward`` that
``torch.compile(fullgraph=True)`` traces. The backend module comes from the one backend table
(``peft_kernels.backends``).

Saved for backward, parameters aside: ``x``, ``u`` (M, r) and the dropout state (the torch
path's bool mask, the triton path's 8-byte seed) when dropout is on. DoRA adds the norm (out,)
and what its backend asks for ``grad_m``: the output y itself (torch, no dropout: the storage
its consumer usually saves anyway) or the pre-scale output base (M, out). Never an out×in
tensor and never ``dropout(x)``.
"""

from __future__ import annotations

from torch import Tensor

from peft_kernels.backends import backend_module
from peft_kernels.contract import AdapterArgs, Forward, Grads, Saved, present
from peft_kernels.dual_op import dual_op


def _forward(
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
) -> Forward:
    """y (M, out) of the adapter layer on ``backend`` ("torch" | "triton"), x (M, in).

    LoRA when ``magnitude`` and ``weight_norm`` are None, else DoRA; shapes, dtypes and math as
    in ``peft_kernels.contract`` (``seed``: int64 (1,) when ``dropout_p > 0``, else None).
    As an op's forward: ``(y, u (M, r), dropout state, base)``, the backend's ``Forward``.
    """
    return backend_module(backend).forward(
        x, weight, bias, lora_A, lora_B, magnitude, weight_norm,
        scaling=scaling, dropout_p=dropout_p, seed=seed,
    )  # fmt: skip


def _forward_fake(*args) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    inputs, (_scaling, dropout_p, _seed, backend) = AdapterArgs(*args[:7]), args[7:]
    x, rows, out_features = inputs.x, inputs.x.shape[0], inputs.weight.shape[0]
    impl = backend_module(backend)
    state_shape, state_dtype = impl.dropout_state_spec(tuple(x.shape), dropout_p)
    keeps_base = inputs.magnitude is not None and impl.dora_keeps_base(
        dropout_p, x.dtype, inputs.lora_A.dtype
    )
    return (
        x.new_empty(rows, out_features),
        x.new_empty(rows, inputs.lora_A.shape[0], dtype=inputs.lora_A.dtype),
        x.new_empty(state_shape, dtype=state_dtype),
        x.new_empty((rows, out_features) if keeps_base else (0,)),
    )


def _save(args: tuple, out: tuple) -> tuple[Saved, tuple[float, float, str]]:
    """``Saved`` (the inputs, u, the dropout state, DoRA's base or else y) and the options."""
    inputs, (scaling, dropout_p, _seed, backend) = AdapterArgs(*args[:7]), args[7:]
    y, u, state, base = out
    base = present(base)
    dora_out = None if inputs.magnitude is None else (y if base is None else base)
    return Saved(*inputs, u, present(state), dora_out), (scaling, dropout_p, backend)


def _backward(
    grad_y: Tensor,
    saved: list[Tensor | None],
    scaling: float,
    dropout_p: float,
    backend: str,
    needs: list[bool],
) -> Grads:
    """``Grads`` (x, lora_A, lora_B, magnitude, bias) from ``backend``; None where not needed."""
    needs_grad_x, *_, needs_grad_bias = needs
    return backend_module(backend).backward(
        grad_y.contiguous(),
        Saved(*saved),
        scaling=scaling,
        dropout_p=dropout_p,
        needs_grad_x=needs_grad_x,
        needs_grad_bias=needs_grad_bias,
    )


def _backward_fake(grad_y, saved, scaling, dropout_p, backend, needs) -> Grads:
    saved = Saved(*saved)
    x, magnitude = saved.x, saved.magnitude
    needs_grad_x, *_, needs_grad_bias = needs
    return Grads(
        x.new_empty(x.shape if needs_grad_x else (0,)),
        saved.lora_A.new_empty(saved.lora_A.shape),
        saved.lora_B.new_empty(saved.lora_B.shape),
        x.new_empty(0) if magnitude is None else magnitude.new_empty(magnitude.shape),
        x.new_empty(saved.weight.shape[0] if needs_grad_bias else 0),
    )


adapter_linear = dual_op(
    "adapter_linear",
    forward=_forward,
    forward_fake=_forward_fake,
    save=_save,
    backward=_backward,
    backward_fake=_backward_fake,
    differentiable=Grads._fields,
)
adapter_linear_op = adapter_linear.op  # torch.ops.peft_kernels.adapter_linear
