"""The one contract every compiled backend (``torch``, ``triton``) implements.

A backend is a module with these functions::

    forward(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, *,
            scaling, dropout_p, seed) -> Forward
    backward(grad_y, saved: Saved, *, scaling, dropout_p,
             needs_grad_x, needs_grad_bias) -> Grads
    dropout_state_spec(x_shape, dropout_p) -> (shape, dtype)   # for fake tensors
    dora_keeps_base(dropout_p, dtype, adapter_dtype) -> bool   # ditto: is Forward.base filled?

LoRA and DoRA are one op: ``magnitude`` and ``weight_norm`` are None for LoRA.

Shapes and dtypes. ``x (M, in)`` contiguous, ``weight`` W ``(out, in)`` (any strides), ``bias
(out,) | None``: the *compute dtype*. ``lora_A`` A ``(r, in)``, ``lora_B`` B ``(out, r)``,
``magnitude`` m ``(out,)``: the *adapter dtype*, the compute dtype or wider (float32 adapters on
a bfloat16 base run the adapter branch in float32, as peft does). ``weight_norm`` n ``(out,)``
is DoRA's ``‖W + s·B A‖_row``, a constant, in at least float32. ``seed`` is an int64 ``(1,)``
tensor when ``dropout_p > 0`` (dropout keeps ``x[i, k]`` with probability ``1 − p``), else None.

Dropout state. What backward needs to redo dropout is a tensor whose meaning is the backend's
own: the torch backend's bool keep-mask ``(M, in)``, the triton backend's Philox seed ``(1,)``
(it regenerates the mask). Without dropout it is None (an empty tensor inside the custom ops,
which cannot return None). ``dropout_state_spec`` gives its shape and dtype ahead of time (for
``torch.compile``'s fake tensors).

What backward reads for DoRA's ``grad_m = Σ_rows grad_y ⊙ base / n`` (base the pre-scale
output): ``Forward.base``, an (M, out) tensor whose exact meaning is the backend's own (the
triton kernels keep base, the torch backend its dense part ``x̃ Wᵀ``), or, when it is None,
the output y: without dropout ``base = (y − b) / c`` with ``c = m / n``, so
``grad_m = Σ_rows grad_y ⊙ (y − b) / m``, and the output, which its consumer usually saves
anyway, is all DoRA keeps beyond LoRA's tensors. ``dora_keeps_base`` says which, ahead of time.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
from torch import Tensor


class AdapterArgs(NamedTuple):
    """The tensors of an adapter layer, in the order every op and backend takes them."""

    x: Tensor  # (M, in), compute dtype
    weight: Tensor  # W (out, in), frozen, compute dtype
    bias: Tensor | None  # (out,), compute dtype
    lora_A: Tensor  # A (r, in), adapter dtype
    lora_B: Tensor  # B (out, r), adapter dtype
    magnitude: Tensor | None  # m (out,), adapter dtype; None: LoRA
    weight_norm: Tensor | None  # n (out,), at least float32; None: LoRA


class Forward(NamedTuple):
    """What a backend's forward returns."""

    y: Tensor  # (M, out), compute dtype
    u: Tensor  # (M, r) = dropout(x) Aᵀ, adapter dtype: saved for grad_B
    dropout_state: Tensor | None  # backend-defined (see the module docstring); None: no dropout
    base: Tensor | None  # DoRA: the (M, out) tensor backward reads for grad_m; None: y (or LoRA)


class Saved(NamedTuple):
    """What backward gets: the forward's inputs (``AdapterArgs``' fields, in its order) and the
    tensors ``Forward`` asked to keep."""

    x: Tensor
    weight: Tensor
    bias: Tensor | None
    lora_A: Tensor
    lora_B: Tensor
    magnitude: Tensor | None
    weight_norm: Tensor | None
    u: Tensor
    dropout_state: Tensor | None  # None without dropout
    dora_out: Tensor | None  # DoRA: Forward.base, or y when base was empty; LoRA: None


class Grads(NamedTuple):
    """Gradients; None where not needed (grad_x, grad_bias) or not defined (LoRA's magnitude)."""

    x: Tensor | None
    lora_A: Tensor
    lora_B: Tensor
    magnitude: Tensor | None
    bias: Tensor | None


class Backend(Protocol):
    """A module implementing the contract (``peft_kernels.torch_linear``, ``.triton_linear``)."""

    def forward(
        self,
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
    ) -> Forward: ...

    def backward(
        self,
        grad_y: Tensor,
        saved: Saved,
        *,
        scaling: float,
        dropout_p: float,
        needs_grad_x: bool,
        needs_grad_bias: bool,
    ) -> Grads: ...

    def dropout_state_spec(
        self, x_shape: tuple[int, ...], dropout_p: float
    ) -> tuple[tuple[int, ...], torch.dtype]: ...

    def dora_keeps_base(
        self, dropout_p: float, dtype: torch.dtype, adapter_dtype: torch.dtype
    ) -> bool: ...


def empty(like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """The empty tensor that stands for None where a tensor must be returned (custom ops)."""
    return like.new_empty(0, dtype=dtype)


def present(tensor: Tensor | None) -> Tensor | None:
    """``tensor``, or None for None and for the empty tensor that stands for it."""
    return tensor if tensor is not None and tensor.numel() else None
