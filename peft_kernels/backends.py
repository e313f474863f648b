"""Which implementation runs an op: ``naive``, ``torch``, ``triton`` or ``auto``.

- ``naive``: plain autograd torch ops, the "naive matmuls" baseline and the reference.
- ``torch``: hand-written forward and backward in PyTorch, the CPU fallback.
- ``triton``: fused Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).
- ``auto``: ``triton`` for CUDA tensors when triton imports, else ``torch``.

The environment variable ``LIGHTNING_PEFT_BACKEND`` replaces ``auto`` with a fixed choice.
An explicitly requested backend that cannot run raises; ``auto`` falls back quietly.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "naive", "torch", "triton")
BACKEND_ENV_VAR = "LIGHTNING_PEFT_BACKEND"

# Looked up once at import: whether triton is installed, without importing it.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_installed() -> bool:
    """True when the ``triton`` package can be imported."""
    return _TRITON_INSTALLED


def triton_interpreted() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on ``device`` here, ``auto`` excluded."""
    device = torch.device(device)
    names = ["naive", "torch"]
    if triton_installed() and (device.type == "cuda" or triton_interpreted()):
        names.append("triton")
    return names


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn a requested backend name into the one that will run on ``device``.

    Raises:
        ValueError: ``backend`` (or the environment variable) is not one of ``BACKENDS``.
        RuntimeError: ``triton`` was asked for explicitly but cannot run here.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    explicit = backend != "auto"
    if not explicit:
        backend = os.environ.get(BACKEND_ENV_VAR, "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(
                f"{BACKEND_ENV_VAR}={backend!r} is not a backend; "
                f"choose one of {', '.join(BACKENDS)}"
            )
        explicit = backend != "auto"
    if not explicit:
        return "triton" if device.type == "cuda" and triton_installed() else "torch"
    if backend == "triton":
        if not triton_installed():
            raise RuntimeError(
                "backend 'triton' was requested but the triton package is not installed"
            )
        if device.type != "cuda" and not triton_interpreted():
            raise RuntimeError(
                f"backend 'triton' needs CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 "
                "before importing triton to run the kernels on the CPU through the interpreter"
            )
    return backend
