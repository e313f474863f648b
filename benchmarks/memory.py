"""Memory of one training step: what autograd saves for backward, and the peak it reaches.

- **Saved for backward**: the forward runs under ``torch.autograd.graph.saved_tensors_hooks``;
  the tensors the live graph still holds once the forward returned are counted once per storage
  (``untyped_storage().data_ptr()``), the storages of ``excluded`` tensors (parameters, buffers)
  left out. A layer that saves its own output, which its consumer saves too, costs nothing extra.
- **Peak**: the most bytes allocated at any moment of forward + backward beyond what was
  allocated when the step began. CUDA: ``torch.cuda.max_memory_allocated``. CPU: the
  allocation events of ``torch.profiler`` (``profile_memory=True``), summed in time order.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class StepMemory:
    saved_bytes: int  # distinct storages saved for backward, parameters and buffers excluded
    peak_bytes: int  # peak allocation during forward + backward, above the level at the start


def storage_key(tensor: Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def saved_storages(
    run: Callable[[], Tensor], excluded_keys: set[int]
) -> tuple[Tensor, dict[int, int]]:
    """Run ``run()`` and return its result and the storages its live graph still holds for
    backward (``storage_key`` -> bytes), those in ``excluded_keys`` left out.

    Every tensor autograd saves passes through a ``saved_tensors_hooks`` pack hook; a weak
    reference tells which ones the graph still holds after ``run`` returned (temporaries of a
    graph that was dropped inside it do not count).
    """
    packed: list[weakref.ref[Tensor]] = []

    def pack(tensor: Tensor) -> Tensor:
        # A detached alias: returning a node's own output would tie it to the node in a
        # reference cycle and keep graphs alive that the forward has dropped.
        alias = tensor.detach()
        packed.append(weakref.ref(alias))
        return alias

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = run()
    gc.collect()
    storages: dict[int, int] = {}
    for ref in packed:
        tensor = ref()
        if tensor is None:
            continue
        key = storage_key(tensor)
        if key != 0 and key not in excluded_keys:
            storages[key] = tensor.untyped_storage().nbytes()
    return out, storages


def _saved_bytes(forward: Callable[[], Tensor], excluded_keys: set[int]) -> tuple[Tensor, int]:
    """Run ``forward`` (returns a scalar loss) and count what its graph saved; returns both."""
    loss, storages = saved_storages(forward, excluded_keys)
    return loss, sum(storages.values())


def _peak_from_profiler(profiler) -> int:
    events = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda event: event.start_ns())
    level = peak = 0
    for event in events:
        level += event.nbytes()
        peak = max(peak, level)
    return peak


def measure_step_memory(
    forward: Callable[[], Tensor],
    excluded: Iterable[Tensor],
    device: torch.device,
    clear: Callable[[], None],
) -> StepMemory:
    """Saved bytes and peak memory of one step: ``clear()``, ``forward()``, backward.

    ``clear`` drops what a previous step left (gradients) before the measurement starts, so
    that freeing it does not count against the peak.
    """
    excluded_keys = {storage_key(tensor) for tensor in excluded}
    clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        loss, saved = _saved_bytes(forward, excluded_keys)
        loss.backward()
        torch.cuda.synchronize(device)
        return StepMemory(saved, torch.cuda.max_memory_allocated(device) - start)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        loss, saved = _saved_bytes(forward, excluded_keys)
        loss.backward()
    return StepMemory(saved, _peak_from_profiler(profiler))
