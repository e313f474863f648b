"""Finite checks: is there a NaN or an infinity in these tensors, and where.

``maybe_non_finite`` is the per-step test of ``PEFTCallback``: one fused L2-norm reduction
(``torch._foreach_norm``) over all the tensors, no host synchronisation; the caller reads the
result once. A tensor's L2 norm is NaN or infinite whenever it holds a NaN or an infinity, and
also, a false alarm, when its finite values are so large (above ~1e19 in float32) that the sum of
squares overflows; ``non_finite_tensors`` therefore confirms each flagged tensor exactly (count
of non-finite values) before anything is reported. The max-abs norm (``ord=inf``) would need no
confirmation but costs ~5x as much on the CPU (18 ms against 3.7 ms for the demo's 420 LoRA
tensors, 4.9M values, one thread).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor


def local(tensor: Tensor) -> Tensor:
    """This process's shard of a DTensor (FSDP2), else the tensor: a local test, no collective."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def maybe_non_finite(tensors: Sequence[Tensor]) -> Tensor:
    """A bool vector, True where ``tensors[i]`` holds a NaN or an infinity, or finite values so
    large that its L2 norm overflows (see the module docstring); False means finite. On the
    tensors' device, no host synchronisation. ``tensors``: any shapes and floating dtypes, one
    device."""
    if not tensors:
        return torch.zeros(0, dtype=torch.bool)
    return ~torch.isfinite(torch.stack(torch._foreach_norm(list(tensors))))


def non_finite_tensors(tensors: Mapping[str, Tensor]) -> list[tuple[str, int, int]]:
    """``[(name, non-finite values, values)]`` of the floating tensors that hold a NaN or an
    infinity, in ``tensors``' order (this process's shards of DTensors): one fused reduction,
    then an exact count for the tensors it flags."""
    floating = {k: v for k, v in tensors.items() if v.is_floating_point() and v.numel()}
    flags = maybe_non_finite([local(v).detach() for v in floating.values()]).tolist()
    counts = [
        (name, int((~torch.isfinite(local(value).detach())).sum()), value.numel())
        for (name, value), flagged in zip(floating.items(), flags, strict=True)
        if flagged
    ]
    return [entry for entry in counts if entry[1]]


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
