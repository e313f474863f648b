"""The adapter branch alone, for a base product computed elsewhere (e.g. a quantized layer).

When the frozen base is a bitsandbytes 4-/8-bit layer, its product ``x Wᵀ + b`` comes from that
layer (bitsandbytes' autograd gives ``grad_x`` through it, and W never exists in full precision
outside it). These ops add what LoRA and DoRA put on top:

- ``lora_delta``: ``d = s·(dropout(x) Aᵀ) Bᵀ``, the LoRA branch; ``y = base(x) + d``.
- ``dora_combine``: DoRA from the base output and the branch,
  ``y = (m/n) ⊙ (base − b + d) + b`` (dropout off), or peft's dropout-on form
  ``y = base(x) + (m/n − 1) ⊙ (base(x̃) − b) + (m/n) ⊙ d(x̃)`` with ``x̃ = dropout(x)``.
  The norm ``n`` is a constant for backward (DoRA paper §4.3); ``peft_kernels.norm.
  factored_weight_norm`` computes it from ``W Aᵀ`` and the cached ``‖W_i‖²``.

Both have a hand-written backward, written once as forward / backward / fake functions and
built by ``peft_kernels.dual_op`` into an eager ``autograd.Function`` (no custom-op dispatch)
and ``torch.library`` custom ops for ``torch.compile``. What they save for backward, parameters
aside: ``lora_delta`` keeps ``x`` and ``u = x̃ Aᵀ`` (M, r), plus the bool keep-mask with dropout
(never ``dropout(x)``); ``dora_combine`` keeps ``z = base − b + d`` (M, out), for the magnitude's
gradient, and the norm (out,). Never an out×in tensor.

Backends: ``"naive"`` is plain autograd (the reference); every other backend runs the torch
implementation here. The branch is two rank-r GEMMs and an elementwise combine, with no base
GEMM to fuse them into, so there is no Triton kernel for it (a ``"triton"`` request is checked
as everywhere, then runs this).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from peft_kernels.backends import TABLE, resolve_backend
from peft_kernels.contract import present
from peft_kernels.dual_op import dual_op
from peft_kernels.functional import _draw_seed
from peft_kernels.torch_linear import _dropped, keep_mask

# -- checks -------------------------------------------------------------------------------------


def _check_same(named: dict[str, Tensor | None], like: str) -> None:
    reference = named[like]
    for name, tensor in named.items():
        if tensor is None:
            continue
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype != reference.dtype:
            raise TypeError(
                f"{name} has dtype {tensor.dtype} but {like} has {reference.dtype}; "
                "cast them to one dtype"
            )
        if tensor.device != reference.device:
            raise ValueError(f"{name} is on {tensor.device} but {like} is on {reference.device}")


def _check_branch(x: Tensor, lora_A: Tensor, lora_B: Tensor, dropout_p: float) -> None:
    _check_same({"x": x, "lora_A": lora_A, "lora_B": lora_B}, "x")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 1 or lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError(
            f"x must be (..., in), lora_A (r, in) and lora_B (out, r); got shapes "
            f"{tuple(x.shape)}, {tuple(lora_A.shape)}, {tuple(lora_B.shape)}"
        )
    if lora_A.shape[0] == 0:
        raise ValueError("rank r must be >= 1, but lora_A has 0 rows")
    if lora_A.shape[1] != x.shape[-1] or lora_B.shape[1] != lora_A.shape[0]:
        raise ValueError(
            f"shapes do not fit: x {tuple(x.shape)}, lora_A {tuple(lora_A.shape)}, lora_B "
            f"{tuple(lora_B.shape)}; expected (..., in), (r, in), (out, r)"
        )
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def _check_combine(
    base: Tensor,
    delta: Tensor,
    magnitude: Tensor,
    weight_norm: Tensor,
    bias: Tensor | None,
    base_dropped: Tensor | None,
) -> None:
    named = {"base": base, "delta": delta, "magnitude": magnitude, "bias": bias}
    _check_same({**named, "base_dropped": base_dropped}, "base")
    if not isinstance(weight_norm, Tensor) or not weight_norm.is_floating_point():
        raise TypeError("weight_norm must be a floating-point tensor")
    if weight_norm.device != base.device:
        raise ValueError(f"weight_norm is on {weight_norm.device} but base is on {base.device}")
    out_features = base.shape[-1]
    for name, tensor in (("delta", delta), ("base_dropped", base_dropped)):
        if tensor is not None and tensor.shape != base.shape:
            raise ValueError(
                f"{name} must have base's shape {tuple(base.shape)}, got {tuple(tensor.shape)}"
            )
    for name, tensor in (("magnitude", magnitude), ("weight_norm", weight_norm), ("bias", bias)):
        if tensor is not None and tuple(tensor.shape) != (out_features,):
            raise ValueError(
                f"{name} must be (out,) = ({out_features},), got {tuple(tensor.shape)}"
            )
    if weight_norm.requires_grad:
        raise ValueError("weight_norm must be detached: DoRA holds the norm constant in backward")


def _rows(t: Tensor) -> Tensor:
    """``t (..., n)`` as a contiguous 2-D ``(M, n)`` view (a copy only when needed)."""
    return t.reshape(-1, t.shape[-1]).contiguous()


# -- lora_delta ---------------------------------------------------------------------------------


def lora_delta(
    x: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    *,
    training: bool = True,
    backend: str = "auto",
) -> Tensor:
    """The LoRA branch ``d = scaling · (dropout(x) Aᵀ) Bᵀ``.

    Args:
        x: (..., in).
        lora_A: A (r, in).
        lora_B: B (out, r).
        scaling: s (``lora_alpha / r``, rsLoRA ``lora_alpha / sqrt(r)``).
        dropout_p: dropout probability on x; active only when ``training``.
        training: whether dropout is active.
        backend: as in ``peft_kernels.backends``; everything but ``"naive"`` runs the torch path.

    Returns:
        d (..., out) in x's dtype.

    Backward: ``grad_B = s·gᵀu``, ``grad_A = s·(g B)ᵀ x̃``, ``grad_x = s·(g B A) ⊙ keep/(1−p)``,
    from ``x``, ``u = x̃ Aᵀ`` and (dropout) the keep-mask.
    """
    _check_branch(x, lora_A, lora_B, dropout_p)
    backend = resolve_backend(backend, x.device)
    dropout_p = float(dropout_p) if training else 0.0
    if not TABLE[backend].hand_written:  # naive: plain autograd
        return F.linear(F.linear(F.dropout(x, dropout_p, training), lora_A), lora_B) * scaling
    seed = _draw_seed(x.device) if dropout_p > 0 else None
    delta = _lora_delta(_rows(x), lora_A, lora_B, float(scaling), dropout_p, seed)
    return delta.view(*x.shape[:-1], lora_B.shape[0])


def _delta_forward(
    x: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float,
    seed: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(d (M, out), u (M, r), keep (M, in) bool or None)``."""
    keep = None if seed is None else keep_mask(seed, tuple(x.shape), dropout_p)
    u = _dropped(x, keep, dropout_p) @ lora_A.T
    return (u @ lora_B.T).mul_(scaling), u, keep


def _delta_forward_fake(x, lora_A, lora_B, scaling, dropout_p, seed):
    return (
        x.new_empty(x.shape[0], lora_B.shape[0]),
        x.new_empty(x.shape[0], lora_A.shape[0]),
        x.new_empty(x.shape if seed is not None else (0,), dtype=torch.bool),
    )


def _delta_save(args: tuple, out: tuple) -> tuple[tuple, tuple[float, float]]:
    """``x, A, B, u`` and the keep-mask (None without dropout); never ``dropout(x)``."""
    x, lora_A, lora_B, scaling, dropout_p, _seed = args
    _, u, keep = out
    return (x, lora_A, lora_B, u, present(keep)), (scaling, dropout_p)


def _delta_backward(
    grad: Tensor,
    saved: list[Tensor | None],
    scaling: float,
    dropout_p: float,
    needs: list[bool],
) -> tuple[Tensor | None, Tensor, Tensor]:
    """``(grad_x or None, grad_A, grad_B)``."""
    x, lora_A, lora_B, u, keep = saved
    grad = grad.contiguous()
    grad_b_proj = grad @ lora_B  # (M, r)
    grad_lora_B = (grad.T @ u).mul_(scaling)
    grad_lora_A = (grad_b_proj.T @ _dropped(x, keep, dropout_p)).mul_(scaling)
    grad_x = None
    if needs[0]:
        grad_x = (grad_b_proj @ lora_A).mul_(scaling)
        if keep is not None:
            grad_x.mul_(keep).mul_(1.0 / (1.0 - dropout_p))
    return grad_x, grad_lora_A, grad_lora_B


def _delta_backward_fake(grad, saved, scaling, dropout_p, needs):
    x, lora_A, lora_B, _u, _keep = saved
    return (
        torch.empty_like(x) if needs[0] else x.new_empty(0),
        torch.empty_like(lora_A),
        torch.empty_like(lora_B),
    )


_lora_delta = dual_op(
    "lora_delta",
    forward=_delta_forward,
    forward_fake=_delta_forward_fake,
    save=_delta_save,
    backward=_delta_backward,
    backward_fake=_delta_backward_fake,
    differentiable=("x", "lora_A", "lora_B"),
)


# -- dora_combine -------------------------------------------------------------------------------


def dora_combine(
    base: Tensor,
    delta: Tensor,
    magnitude: Tensor,
    weight_norm: Tensor,
    bias: Tensor | None = None,
    base_dropped: Tensor | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """DoRA's output from the base layer's output and the LoRA branch, with ``c = m / n``.

    Dropout off (``base_dropped`` None): ``y = c ⊙ (base − b + delta) + b``.
    Dropout on, peft's definition (``base_dropped = base(x̃)``, ``delta = d(x̃)``):
    ``y = base + (c − 1) ⊙ (base_dropped − b) + c ⊙ delta``.

    Args:
        base: ``x Wᵀ + b`` (..., out), from the base layer.
        delta: ``s·(x̃ Aᵀ) Bᵀ`` (..., out), from ``lora_delta``.
        magnitude: m (out,), in base's dtype.
        weight_norm: n = ‖W + sBA‖_row (out,), detached (a constant in backward), in any float
            dtype (``c`` is computed in it: at least float32 from ``peft_kernels.norm``).
        bias: b (out,) of the base layer in base's dtype, or None; it gets the gradient of its
            explicit terms when it requires grad (the base layer adds the rest).
        base_dropped: ``x̃ Wᵀ + b`` (..., out) when dropout is on, else None.
        backend: ``"naive"`` for plain autograd; anything else runs the hand-written op.

    Returns:
        y (..., out) in base's dtype.

    Backward (g = grad_y): ``grad_base = c ⊙ g`` (dropout on: ``g``), ``grad_base_dropped =
    (c − 1) ⊙ g``, ``grad_delta = c ⊙ g``, ``grad_m = Σ g ⊙ z / n`` with ``z = (base_dropped or
    base) − b + delta`` saved from forward, ``grad_b = Σ g ⊙ (1 − c)``.
    """
    _check_combine(base, delta, magnitude, weight_norm, bias, base_dropped)
    if not TABLE[resolve_backend(backend, base.device)].hand_written:  # naive: plain autograd
        column_scale = _column_scale(magnitude, weight_norm, base.dtype)
        b = 0 if bias is None else bias
        if base_dropped is None:
            return column_scale * (base - b + delta) + b
        return base + (column_scale - 1) * (base_dropped - b) + column_scale * delta
    dropped = None if base_dropped is None else _rows(base_dropped)
    y = _dora_combine(_rows(base), _rows(delta), magnitude, weight_norm, bias, dropped)
    return y.view(base.shape)


def _column_scale(magnitude: Tensor, weight_norm: Tensor, dtype: torch.dtype) -> Tensor:
    return (magnitude.to(weight_norm.dtype) / weight_norm).to(dtype)


def _combine_forward(
    base: Tensor,
    delta: Tensor,
    magnitude: Tensor,
    weight_norm: Tensor,
    bias: Tensor | None,
    base_dropped: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """``(y (M, out), z (M, out))`` with ``z = (base_dropped or base) − b + delta``."""
    column_scale = _column_scale(magnitude, weight_norm, base.dtype)
    z = (base if base_dropped is None else base_dropped) + delta
    if bias is not None:
        z.sub_(bias)
    # Dropout on: base + (c − 1)(base_dropped − b) + c·delta = (base − base_dropped) + c·z + b.
    if base_dropped is None:
        y = z * column_scale
    else:
        y = torch.addcmul(base - base_dropped, z, column_scale)
    if bias is not None:
        y.add_(bias)
    return y, z


def _combine_forward_fake(base, delta, magnitude, weight_norm, bias, base_dropped):
    return torch.empty_like(base), torch.empty_like(base)


def _combine_save(args: tuple, out: tuple) -> tuple[tuple, tuple[bool]]:
    """``z`` (M, out), m and n; whether dropout was on."""
    _base, _delta, magnitude, weight_norm, _bias, base_dropped = args
    return (out[1], magnitude, weight_norm), (base_dropped is not None,)


def _combine_backward(
    grad: Tensor,
    saved: list[Tensor | None],
    dropped: bool,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(c ⊙ g, grad_m, grad_b or None)``; ``_combine_route`` hands them to the inputs."""
    z, magnitude, weight_norm = saved
    grad = grad.contiguous()
    grad_scaled = grad * _column_scale(magnitude, weight_norm, grad.dtype)
    grad_magnitude = (grad * z).sum(0).to(weight_norm.dtype).div_(weight_norm).to(magnitude.dtype)
    needs_grad_bias = needs[3]
    grad_bias = grad.sum(0).sub_(grad_scaled.sum(0)) if needs_grad_bias else None  # Σ g(1 − c)
    return grad_scaled, grad_magnitude, grad_bias


def _combine_backward_fake(grad, saved, dropped, needs):
    _z, magnitude, _weight_norm = saved
    return (
        torch.empty_like(grad),
        torch.empty_like(magnitude),
        grad.new_empty(grad.shape[1]) if needs[3] else grad.new_empty(0),
    )


def _combine_route(grad: Tensor, grads: tuple, dropped: bool) -> tuple:
    """Gradients of (base, delta, magnitude, bias, base_dropped). With dropout base gets g and
    base_dropped (c − 1) ⊙ g; without, base gets c ⊙ g, the tensor delta gets (autograd never
    writes into it)."""
    grad_scaled, grad_magnitude, grad_bias = grads
    if dropped:
        return grad, grad_scaled, grad_magnitude, grad_bias, grad_scaled - grad
    return grad_scaled, grad_scaled, grad_magnitude, grad_bias, None


_dora_combine = dual_op(
    "dora_combine",
    forward=_combine_forward,
    forward_fake=_combine_forward_fake,
    save=_combine_save,
    backward=_combine_backward,
    backward_fake=_combine_backward_fake,
    differentiable=("base", "delta", "magnitude", "bias", "base_dropped"),
    route=_combine_route,
)
