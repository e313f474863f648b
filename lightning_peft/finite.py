"""Finite checks: is there a NaN or an infinity in these tensors, and where.

``non_finite_flags`` is the per-step test of ``PEFTCallback``: one fused max-abs reduction
(``torch._foreach_norm(..., ord=inf)``) over all the tensors, no host synchronisation; the
caller reads the result once. The max-abs norm is NaN or infinite exactly when the tensor holds a
NaN or an infinity; the usual L2 norm is not a test (it overflows to inf for finite values above
~1e19 in float32). The other functions run only once something was found, or once per save.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor


def local(tensor: Tensor) -> Tensor:
    """This process's shard of a DTensor (FSDP2), else the tensor: a local test, no collective."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def non_finite_flags(tensors: Sequence[Tensor]) -> Tensor:
    """A bool vector, True where ``tensors[i]`` holds a NaN or an infinity (on the tensors'
    device; no host synchronisation). ``tensors``: any shapes and floating dtypes, one device."""
    if not tensors:
        return torch.zeros(0, dtype=torch.bool)
    norms = torch._foreach_norm(list(tensors), ord=math.inf)
    return ~torch.isfinite(torch.stack(norms))


def non_finite_tensors(tensors: Mapping[str, Tensor]) -> list[tuple[str, int, int]]:
    """``[(name, non-finite values, values)]`` of the floating tensors that hold a NaN or an
    infinity, in ``tensors``' order."""
    floating = {k: v for k, v in tensors.items() if v.is_floating_point() and v.numel()}
    flags = non_finite_flags([local(v).detach() for v in floating.values()]).tolist()
    return [
        (name, int((~torch.isfinite(local(value).detach())).sum()), value.numel())
        for (name, value), bad in zip(floating.items(), flags, strict=True)
        if bad
    ]


def describe_non_finite(found: list[tuple[str, int, int]], total: int, noun: str) -> str:
    """``"the <noun>s of 3 of the 420 trained tensors are not finite, first NAME (12 of 256
    values NaN or infinite)"``, from ``non_finite_tensors``' list."""
    name, bad, size = found[0]
    values = f"{bad:,} of {size:,} values NaN or infinite"
    if len(found) == 1:
        return f"the {noun} of {name} is not finite ({values})"
    return (
        f"the {noun}s of {len(found)} of the {total} trained tensors are not finite, first "
        f"{name} ({values})"
    )


def last_finite_checkpoint(paths: list[Path]) -> str:
    """Which of ``paths`` (checkpoints this run wrote or resumed from) is the newest whose
    tensors are all finite, as a phrase for an error message."""
    files = sorted((p for p in set(paths) if p.exists()), key=lambda p: p.stat().st_mtime_ns)
    if not files:
        return "no checkpoint was written"
    unreadable = []
    for path in reversed(files):
        if path.is_dir():
            return f"the newest checkpoint is {path} (sharded: its tensors were not checked)"
        try:
            checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            tensors = {
                k: v for k, v in (checkpoint.get("state_dict") or {}).items() if torch.is_tensor(v)
            }
        except Exception:  # a file we cannot read is named, not trusted
            unreadable.append(str(path))
            continue
        if not non_finite_tensors(tensors):
            step = checkpoint.get("global_step")
            at = f" (step {step})" if step is not None else ""
            return f"the last checkpoint with finite tensors is {path}{at}"
    which = f"; not readable: {', '.join(unreadable)}" if unreadable else ""
    return f"none of the {len(files)} checkpoints written holds finite tensors{which}"
