"""Side-by-side timing: every implementation once per round, in a rotated order.

Ratios to the floor are only meaningful when the floor and the implementation ran under the
same conditions (clock, cache, what else the machine was doing). So rounds interleave the
implementations: round k times each of them once, starting at a different one each round, and
the median over rounds is reported per implementation. On CUDA a sample is timed with CUDA
events between synchronisations; on the CPU with ``time.perf_counter``. A sample runs a call
``inner`` times, chosen so that one sample lasts at least ``min_sample_s``.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TimingStats:
    """Per-call seconds of one implementation over the rounds."""

    median: float
    q1: float
    q3: float
    minimum: float
    maximum: float
    repeats: int
    inner: int

    @classmethod
    def of(cls, samples: list[float], inner: int) -> TimingStats:
        if len(samples) >= 2:
            q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
        else:
            q1 = q3 = samples[0]
        return cls(
            median=statistics.median(samples),
            q1=q1,
            q3=q3,
            minimum=min(samples),
            maximum=max(samples),
            repeats=len(samples),
            inner=inner,
        )

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No Python garbage collection inside timed regions (it would land on a random sample)."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


CLOCKS = ("wall", "cpu")


class SampleTimer:
    """Times ``inner`` calls of a function on one device; returns seconds per call.

    ``clock="cpu"`` (CPU devices only) counts the CPU time of this process
    (``time.process_time``) instead of wall time: on a machine shared with other jobs it leaves
    out the time the scheduler gave to them (at one torch thread it is the compute time; with
    more, OpenMP threads that spin while waiting add to it).
    """

    def __init__(self, device: torch.device, clock: str = "wall") -> None:
        if clock not in CLOCKS:
            raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
        self.cuda = device.type == "cuda"
        if self.cuda and clock == "cpu":
            raise ValueError("clock='cpu' times CPU work; CUDA samples are timed with events")
        self.now = time.process_time if clock == "cpu" else time.perf_counter

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], object], inner: int) -> float:
        self.synchronize()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / inner
        start_s = self.now()
        for _ in range(inner):
            fn()
        return (self.now() - start_s) / inner


def calibrate_inner(timer: SampleTimer, fn: Callable[[], object], min_sample_s: float) -> int:
    """Calls per sample so that a sample lasts at least ``min_sample_s`` (at most 1000).

    ``min_sample_s <= 0`` means one call per sample, without a calibration call.
    """
    if min_sample_s <= 0:
        return 1
    once = max(timer(fn, 1), 1e-7)
    return max(1, min(1000, math.ceil(min_sample_s / once)))


def sample_interleaved(
    functions: Mapping[str, Callable[[], object]],
    device: torch.device,
    repeats: int,
    inner: Mapping[str, int] | None = None,
    on_sample: Callable[[str], None] | None = None,
    clock: str = "wall",
) -> dict[str, list[float]]:
    """Seconds per call of every function, one sample per round, rounds in a rotated order.

    Sample ``k`` of every name comes from round ``k``: ratios of two names' samples of the same
    round are *paired* (the same minute of a shared machine). No warm-up here.

    Args:
        functions: name -> a call to time (it synchronises nothing itself).
        device: where the work runs (CUDA: event timing).
        repeats: rounds; each round takes one sample of every function.
        inner: calls per sample, per name (default 1).
        on_sample: called with the name after each sample (progress reporting).
        clock: "wall" or "cpu" (see ``SampleTimer``).
    """
    names = list(functions)
    timer = SampleTimer(device, clock)
    samples: dict[str, list[float]] = {name: [] for name in names}
    with _gc_paused():
        for round_index in range(repeats):
            start = round_index % len(names)
            for name in names[start:] + names[:start]:
                calls = 1 if inner is None else inner[name]
                samples[name].append(timer(functions[name], calls))
                if on_sample is not None:
                    on_sample(name)
    return samples


def time_interleaved(
    functions: Mapping[str, Callable[[], object]],
    device: torch.device,
    repeats: int,
    warmup: int = 1,
    min_sample_s: float = 0.0,
    on_round: Callable[[], None] | None = None,
) -> dict[str, TimingStats]:
    """Median-based stats per name, the functions timed round by round in a rotated order.

    Args:
        functions: name -> a call to time (it synchronises nothing itself).
        device: where the work runs (CUDA: event timing).
        repeats: rounds; each round takes one sample of every function.
        warmup: untimed calls of every function first (allocator, caches, JIT).
        min_sample_s: calls per sample are calibrated so a sample lasts this long.
        on_round: called after each round (progress reporting).
    """
    names = list(functions)
    timer = SampleTimer(device)
    for _ in range(warmup):
        for name in names:
            functions[name]()
    timer.synchronize()
    inner = {name: calibrate_inner(timer, functions[name], min_sample_s) for name in names}
    done = [0]

    def round_done(_name: str) -> None:
        done[0] += 1
        if on_round is not None and done[0] % len(names) == 0:
            on_round()

    samples = sample_interleaved(functions, device, repeats, inner, round_done)
    return {name: TimingStats.of(samples[name], inner[name]) for name in names}
