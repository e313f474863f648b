"""Shared set-up of the pytest-benchmark suites (``test_bench_lora.py``, ``test_bench_dora.py``).

One layer per method, on CUDA when there is one: CPU M=512, in=out=2048, r=16, float32;
CUDA M=8192, in=out=4096, r=16, bfloat16. Tests are parametrized by implementation x mode and
grouped per mode, so pytest-benchmark's table compares the implementations of one mode.
For ratios measured side by side use ``python -m benchmarks`` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from benchmarks.common import (
    MODES,
    BenchCase,
    CaseSpec,
    build_cases,
    implementations_for,
    mode_callable,
)
from benchmarks.environment import torch_threads, usable_cpus

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROUNDS = {"cpu": 8, "cuda": 30}[DEVICE]
ITERATIONS = {"cpu": 1, "cuda": 10}[DEVICE]


def suite_spec(method: str) -> CaseSpec:
    """The one layer a suite benchmarks for ``method``."""
    if DEVICE == "cuda":
        return CaseSpec(method, 8192, 4096, 4096, 16, dtype=torch.bfloat16, device="cuda")
    return CaseSpec(method, 512, 2048, 2048, 16)


def implementation_x_mode() -> list[tuple[str, str]]:
    """Every (implementation, mode) pair that runs here."""
    return [(name, mode) for name in implementations_for(DEVICE) for mode in MODES]


def cases_for(method: str) -> Iterator[dict[str, BenchCase]]:
    """Generator body of a module-scoped fixture: the cases, with torch on all usable CPUs."""
    with torch_threads(usable_cpus()):
        yield build_cases(suite_spec(method), implementations_for(DEVICE))


def _synchronized(fn: Callable[[], object]) -> Callable[[], None]:
    def call() -> None:
        fn()
        torch.cuda.synchronize()

    return call


def run_benchmark(benchmark, case: BenchCase, mode: str) -> None:
    """Time ``case`` in ``mode`` with pytest-benchmark; saved bytes go into ``extra_info``."""
    fn = mode_callable(case, mode)
    if DEVICE == "cuda":
        fn = _synchronized(fn)
    saved = case.saved_bytes()
    benchmark.group = f"{case.spec.label()} {mode}"
    benchmark.extra_info.update(
        implementation=case.implementation,
        mode=mode,
        spec=case.spec.label(),
        dtype=str(case.spec.dtype),
        saved_bytes=saved.total,
        saved_bytes_beyond_x=saved.beyond_x,
    )
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=ITERATIONS, warmup_rounds=1)


def parametrize_cases() -> pytest.MarkDecorator:
    return pytest.mark.parametrize(("implementation", "mode"), implementation_x_mode())
