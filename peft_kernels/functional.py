"""The public functional API: ``lora_linear`` and ``dora_linear``.

Shapes follow peft so that weights map one to one: ``x (..., in)``, ``weight (out, in)``
frozen, ``bias (out,) | None``, ``lora_A (r, in)``, ``lora_B (out, r)``, ``magnitude (out,)``.
LoRA: Hu et al. 2021, https://arxiv.org/abs/2106.09685.
DoRA: Liu et al. 2024, https://arxiv.org/abs/2402.09353 (norm detached, §4.3).

Dtypes. ``x``, ``weight`` and ``bias`` share the compute dtype; the adapter tensors (``lora_A``,
``lora_B``, ``magnitude``) share the adapter dtype, the compute dtype or wider: float32 adapters on
a bfloat16 base run the adapter branch in float32 (``u = x̃ Aᵀ`` kept in float32, the low-rank
term added to the base output with one rounding), as peft does. Under autocast the base operands
are cast to the autocast dtype first (what ``F.linear`` would do) and the adapters keep theirs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from peft_kernels import ops
from peft_kernels._validation import check_adapter_inputs
from peft_kernels.backends import TABLE, backend_module, resolve_backend
from peft_kernels.norm import dora_weight_norm


def _draw_seed(device: torch.device) -> Tensor:
    """A dropout seed from the default generator of ``device``: ``torch.manual_seed`` rules it."""
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)


def _cast(tensor, dtype: torch.dtype):
    """``tensor.to(dtype)``; anything else (None, a bad argument) passes through to the checks."""
    return tensor.to(dtype) if isinstance(tensor, Tensor) else tensor


def _adapter_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor | None,
    scaling: float,
    dropout_p: float,
    training: bool,
    backend: str,
    weight_sq_norm: Tensor | None,
    weight_norm: Tensor | None = None,
) -> Tensor:
    """LoRA (``magnitude`` None) or DoRA: checks, backend choice, dropout seed, then the op.

    Kept lean: a decoding step calls this for every adapted layer, once per token.
    """
    if isinstance(x, Tensor) and torch.is_autocast_enabled(x.device.type):
        autocast = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            return _adapter_linear(
                x.to(autocast),
                _cast(weight, autocast),
                _cast(bias, autocast),
                lora_A,
                lora_B,
                magnitude,
                scaling,
                dropout_p,
                training,
                backend,
                weight_sq_norm,
                weight_norm,
            )
    check_adapter_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, magnitude)
    backend = resolve_backend(backend, x.device)
    if not TABLE[backend].hand_written:  # naive: the layer as plain autograd ops
        return backend_module(backend).adapter_linear(
            x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, training
        )
    dropout_p = float(dropout_p) if training else 0.0
    seed = _draw_seed(x.device) if dropout_p > 0 else None
    if magnitude is None:
        weight_norm = None
    elif weight_norm is None:
        weight_norm = dora_weight_norm(weight, lora_A, lora_B, scaling, weight_sq_norm)
    elif weight_norm.shape != (weight.shape[0],):
        raise ValueError(
            f"weight_norm must be (out,) = ({weight.shape[0]},), got {tuple(weight_norm.shape)}"
        )
    flat = x.ndim == 2
    rows = x if flat else x.reshape(-1, x.shape[-1])
    y = ops.adapter_linear(
        rows if rows.is_contiguous() else rows.contiguous(),
        weight, bias, lora_A, lora_B, magnitude, weight_norm,
        float(scaling), dropout_p, seed, backend,
    )  # fmt: skip
    return y if flat else y.view(*x.shape[:-1], weight.shape[0])


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    *,
    training: bool = True,
    backend: str = "auto",
) -> Tensor:
    """LoRA linear layer: ``y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ``.

    Args:
        x: (..., in).
        weight: W (out, in), frozen (must not require grad), x's dtype.
        bias: (out,) or None, x's dtype; it gets a gradient when it requires grad.
        lora_A: A (r, in), x's dtype or wider (e.g. float32 on a bfloat16 base).
        lora_B: B (out, r), A's dtype.
        scaling: s, ``lora_alpha / r`` (rsLoRA: ``lora_alpha / sqrt(r)``).
        dropout_p: dropout probability on the adapter's input; active only when ``training``.
        training: whether dropout is active.
        backend: "auto" | "naive" | "torch" | "triton" (see ``peft_kernels.backends``).

    Returns:
        y (..., out) in x's dtype (the autocast dtype under autocast).

    Raises:
        TypeError / ValueError: bad dtypes, shapes, devices, ``r == 0``, a weight that requires
            grad, ``dropout_p`` outside [0, 1).
        RuntimeError: an explicitly requested backend cannot run here.
    """
    return _adapter_linear(
        x, weight, bias, lora_A, lora_B, None, scaling, dropout_p, training, backend, None
    )


def dora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    *,
    training: bool = True,
    backend: str = "auto",
    weight_sq_norm: Tensor | None = None,
    weight_norm: Tensor | None = None,
) -> Tensor:
    """DoRA linear layer, with ``n_i = ‖W_i + scaling·(B A)_i‖₂`` a constant in backward.

    Dropout off (``dropout_p == 0`` or not ``training``):
        ``y = (m / n) ⊙ (x Wᵀ + scaling · (x Aᵀ) Bᵀ) + b`` (no GEMM beyond LoRA's).
    Dropout on, exactly as peft: with ``x̃ = dropout(x)``,
        ``y = x Wᵀ + b + (m/n − 1) ⊙ (x̃ Wᵀ) + (m/n) ⊙ scaling · (x̃ Aᵀ) Bᵀ``.

    Without dropout the backward needs no private copy of the pre-scale output on the torch
    backend: it reads y (``grad_m = Σ_rows grad_y ⊙ (y − b) / m``), so y must not be modified in
    place before backward (autograd then raises its in-place error).

    Args:
        x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, backend: as in
            ``lora_linear``.
        magnitude: m (out,), A's dtype.
        weight_sq_norm: optional cached ``‖W_i‖²`` (out,) (see ``peft_kernels.norm``); W is frozen,
            so a layer computes it once.
        weight_norm: optional precomputed ``n`` (out,) from ``dora_weight_norm`` for these W,
            A, B and scaling (e.g. cached while decoding, when A and B do not change); it then
            replaces the norm's computation, and ``weight_sq_norm`` is not read.

    Returns:
        y (..., out) in x's dtype (the autocast dtype under autocast).
    """
    return _adapter_linear(
        x,
        weight,
        bias,
        lora_A,
        lora_B,
        magnitude,
        scaling,
        dropout_p,
        training,
        backend,
        weight_sq_norm,
        weight_norm,
    )
