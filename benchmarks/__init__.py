"""Benchmarks of the LoRA / DoRA kernels against the frozen-linear floor and peft.

``python -m benchmarks`` runs the sweeps (``benchmarks.runner``); ``pytest benchmarks/
--benchmark-only`` runs the pytest-benchmark suites. Both build their cases with
``benchmarks.common``.
"""
