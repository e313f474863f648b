"""Which implementation runs an op: ``naive``, ``torch``, ``triton`` or ``auto``.

- ``naive``: plain autograd torch ops, the "naive matmuls" baseline and the reference.
- ``torch``: hand-written forward and backward in PyTorch, the CPU fallback.
- ``triton``: fused Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).
- ``auto``: ``triton`` for CUDA tensors when triton imports, else ``torch``.

The environment variable ``LIGHTNING_PEFT_BACKEND`` replaces ``auto`` with a fixed choice.
An explicitly requested backend that cannot run raises; ``auto`` falls back quietly.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType
from typing import NamedTuple

import torch


class Backend(NamedTuple):
    """One row of the backend table."""

    module: str  # the module that implements it (imported on first use: triton is optional)
    hand_written: bool  # forward and backward per ``peft_kernels.contract``; else plain autograd
    needs_triton: bool  # runs only where triton does (CUDA, or the CPU interpreter)


# The backend table: every backend, naive included; ``BACKENDS`` and the ops derive from it.
TABLE: dict[str, Backend] = {
    "naive": Backend("peft_kernels.naive", hand_written=False, needs_triton=False),
    "torch": Backend("peft_kernels.torch_linear", hand_written=True, needs_triton=False),
    "triton": Backend("peft_kernels.triton_linear", hand_written=True, needs_triton=True),
}
BACKENDS = ("auto", *TABLE)
BACKEND_ENV_VAR = "LIGHTNING_PEFT_BACKEND"

# Looked up once at import: whether triton is installed, without importing it.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


@functools.cache
def backend_module(name: str) -> ModuleType:
    """The module of backend ``name`` (for hand-written ones: ``peft_kernels.contract``)."""
    return importlib.import_module(TABLE[name].module)


def triton_installed() -> bool:
    """True when the ``triton`` package can be imported."""
    return _TRITON_INSTALLED


def triton_interpreted() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (``TRITON_INTERPRET=1``).

    The one place that reads the variable. Triton reads it when a kernel is decorated, so
    ``peft_kernels.triton_common`` takes its value once, at import.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _runs_here(name: str, device: torch.device) -> bool:
    if not TABLE[name].needs_triton:
        return True
    return triton_installed() and (device.type == "cuda" or triton_interpreted())


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on ``device`` here, ``auto`` excluded."""
    device = torch.device(device)
    return [name for name in TABLE if _runs_here(name, device)]


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn a requested backend name into the one that will run on ``device``.

    Raises:
        ValueError: ``backend`` (or the environment variable) is not one of ``BACKENDS``.
        RuntimeError: a backend that needs triton (``triton``) was asked for explicitly but
            cannot run here.
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
    if TABLE[backend].needs_triton:
        if not triton_installed():
            raise RuntimeError(
                f"backend {backend!r} was requested but the triton package is not installed"
            )
        if device.type != "cuda" and not triton_interpreted():
            raise RuntimeError(
                f"backend {backend!r} needs CUDA tensors (got {device.type}); set "
                "TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU through "
                "the interpreter"
            )
    return backend
