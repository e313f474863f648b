"""Independent float64 references for LoRA and DoRA, written from the formulas.

Every input is copied to a float64 leaf (gradients via autograd in float64); the DoRA norm is
built the direct way, from the full matrix ``W + s·B A``, and detached.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from peft_kernels import available_backends

# Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set by tests/conftest.py without a GPU).
NEEDS_TRITON = pytest.mark.skipif(
    "triton" not in available_backends("cpu"), reason="triton cannot run on CPU tensors here"
)


def make_inputs(
    method: str,
    m: int,
    in_features: int,
    out_features: int,
    rank: int,
    *,
    dtype: torch.dtype = torch.float32,
    bias: bool = True,
    batch: int | None = None,
    seed: int = 0,
) -> dict:
    """Random inputs with a non-zero ``lora_B`` so the adapter does real work.

    Returns a dict with ``x`` ((batch,) m, in) requiring grad, ``weight`` frozen, ``bias``
    requiring grad (or None), ``lora_A``, ``lora_B``, ``magnitude`` (DoRA only) and ``scaling``.
    """
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    x_shape = (m, in_features) if batch is None else (batch, m, in_features)
    inputs = {
        "x": rand(*x_shape).requires_grad_(),
        "weight": rand(out_features, in_features, scale=in_features**-0.5),
        "bias": rand(out_features).requires_grad_() if bias else None,
        "lora_A": rand(rank, in_features, scale=in_features**-0.5).requires_grad_(),
        "lora_B": rand(out_features, rank, scale=0.5).requires_grad_(),
        "scaling": 2.0 / rank,
    }
    if method == "dora":
        norms = torch.linalg.vector_norm(inputs["weight"].double(), dim=1)
        jitter = 1 + 0.2 * torch.rand(out_features, generator=gen, dtype=torch.float64)
        inputs["magnitude"] = (norms * jitter).to(dtype).requires_grad_()
    return inputs


def _leaf64(tensor: Tensor | None) -> Tensor | None:
    if tensor is None:
        return None
    return tensor.detach().double().requires_grad_(tensor.requires_grad)


def reference_forward(method: str, inputs: dict, keep: Tensor | None = None, p: float = 0.0):
    """float64 output and the float64 leaves it was computed from.

    ``keep`` is a bool mask shaped like x (dropout on) or None (dropout off).
    """
    leaves = {k: (_leaf64(v) if isinstance(v, Tensor) else v) for k, v in inputs.items()}
    x, w, b = leaves["x"], leaves["weight"], leaves["bias"]
    a, bb, s = leaves["lora_A"], leaves["lora_B"], leaves["scaling"]
    x_dropped = x if keep is None else x * keep.double() / (1 - p)
    lora = s * (x_dropped @ a.T) @ bb.T
    base = x @ w.T
    if method == "lora":
        y = base + lora
    else:
        norm = torch.linalg.vector_norm(w + s * bb @ a, dim=1).detach()
        c = leaves["magnitude"] / norm
        if keep is None:
            y = c * (base + lora)
        else:
            y = base + (c - 1) * (x_dropped @ w.T) + c * lora
    if b is not None:
        y = y + b
    return y, leaves


def reference_with_grads(method: str, inputs: dict, grad_y: Tensor, keep=None, p: float = 0.0):
    """(y, {name: grad}) in float64 for every input that requires grad."""
    y, leaves = reference_forward(method, inputs, keep, p)
    y.backward(grad_y.double())
    grads = {k: v.grad for k, v in leaves.items() if isinstance(v, Tensor) and v.requires_grad}
    return y.detach(), grads


def call(method: str, inputs: dict, backend: str, p: float = 0.0, training: bool = True):
    """Run ``peft_kernels.lora_linear`` / ``dora_linear`` on ``inputs``."""
    from peft_kernels import dora_linear, lora_linear

    args = [inputs[k] for k in ("x", "weight", "bias", "lora_A", "lora_B")]
    if method == "lora":
        return lora_linear(*args, inputs["scaling"], p, training=training, backend=backend)
    return dora_linear(
        *args, inputs["magnitude"], inputs["scaling"], p, training=training, backend=backend
    )


def grads_of(y: Tensor, inputs: dict, grad_y: Tensor) -> dict:
    """Gradients of ``(y * grad_y).sum()`` for the inputs that require grad."""
    names = [k for k, v in inputs.items() if isinstance(v, Tensor) and v.requires_grad]
    grads = torch.autograd.grad(y, [inputs[k] for k in names], grad_y)
    return dict(zip(names, grads, strict=True))


def max_rel_error(got: Tensor, ref: Tensor) -> float:
    """max |got − ref| / max |ref| (a scale-free error; ref is float64)."""
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def keep_mask_of(backend: str, seed: Tensor, shape: tuple[int, int], p: float) -> Tensor:
    """The bool keep-mask ``backend`` draws from ``seed`` (its forward and backward use it)."""
    if backend == "torch":
        from peft_kernels import torch_linear

        return torch_linear.keep_mask(seed, shape, p)
    from peft_kernels import triton_linear

    return triton_linear.dropout_keep_mask(seed, shape[0], shape[1], p)
