"""``python -m benchmarks profile``: where one adapted layer's time goes, op by op.

For each of SmolLM2-135M's linear shapes (576->1536, 576->576, 576->192, 1536->576) at the
training batch (M=512 rows) and at decoding (M=1, no grad), every implementation of one layer
(the frozen ``nn.Linear``, ``peft_kernels`` on each backend, ``peft``) runs under the profiler;
the table gives the wall time per call, the ratio to the frozen linear, and the ops that took the
most self time (GEMMs, elementwise passes, copies, casts, dispatch wrappers).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import torch

from benchmarks.common import CaseSpec, build_cases
from benchmarks.environment import torch_threads, usable_cpus

SHAPES = ((576, 1536), (576, 576), (576, 192), (1536, 576))


def _timed(fn: Callable[[], object], calls: int, clock: str) -> float:
    now = time.process_time if clock == "cpu" else time.perf_counter
    start = now()
    for _ in range(calls):
        fn()
    return (now() - start) / calls


def _top_ops(fn: Callable[[], object], calls: int, top: int) -> list[tuple[str, float, int]]:
    """(op name, self CPU µs per call, op calls per call) of the ``top`` costliest ops."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(calls):
            fn()
    averages = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [(e.key, e.self_cpu_time_total / calls, e.count // calls) for e in averages[:top]]


def _callables(spec: CaseSpec, decode: bool) -> dict[str, Callable[[], object]]:
    """Per implementation: forward+backward, or (``decode``) a forward under ``no_grad``."""
    calls = {}
    for name, case in build_cases(spec).items():
        if decode:

            def infer(case=case):
                with torch.no_grad():
                    return case.run()

            calls[name] = infer
        else:
            calls[name] = case.forward_backward
    return calls


def profile_shapes(
    methods: Sequence[str], rows: int, decode: bool, calls: int, top: int, clock: str
) -> list[str]:
    lines = []
    for method in methods:
        for in_features, out_features in SHAPES:
            spec = CaseSpec(method, rows, in_features, out_features, 16)
            functions = _callables(spec, decode)
            for fn in functions.values():  # warm-up
                fn()
            times = {name: _timed(fn, calls, clock) for name, fn in functions.items()}
            mode = "inference (no grad)" if decode else "forward+backward"
            lines.append(f"\n{method.upper()} M={rows} {in_features}->{out_features} r=16, {mode}")
            for name, fn in functions.items():
                ratio = times[name] / times["floor"]
                lines.append(f"  {name:<7}{times[name] * 1e6:>9.0f} µs  x{ratio:.2f} floor")
                for op, micros, count in _top_ops(fn, calls, top):
                    lines.append(f"      {micros:>8.0f} µs  {count:>3}x  {op}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks profile", description=__doc__)
    parser.add_argument("--threads", type=int, default=usable_cpus())
    parser.add_argument("--rows", type=int, default=512, help="M for the training profile")
    parser.add_argument("--decode-rows", type=int, default=1, help="M for the inference profile")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--top", type=int, default=6, help="ops listed per implementation")
    parser.add_argument("--methods", nargs="+", default=["lora", "dora"])
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="cpu: this process's CPU time"
    )
    args = parser.parse_args(argv)
    with torch_threads(args.threads):
        lines = profile_shapes(args.methods, args.rows, False, args.calls, args.top, args.clock)
        lines += profile_shapes(
            args.methods, args.decode_rows, True, args.calls * 10, args.top, args.clock
        )
    print("\n".join(lines))
    return 0
