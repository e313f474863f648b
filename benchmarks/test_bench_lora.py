"""pytest-benchmark suite of the LORA layer: every implementation x (forward, forward_backward).

Run with ``pytest benchmarks/ --benchmark-only`` (the project's addopts skip benchmarks).
"""

from collections.abc import Iterator

import pytest

from benchmarks.common import BenchCase
from benchmarks.suite import cases_for, parametrize_cases, run_benchmark


@pytest.fixture(scope="module")
def cases() -> Iterator[dict[str, BenchCase]]:
    yield from cases_for("lora")


@parametrize_cases()
def test_lora(benchmark, cases: dict[str, BenchCase], implementation: str, mode: str) -> None:
    run_benchmark(benchmark, cases[implementation], mode)
