"""``python -m benchmarks``: the LoRA and DoRA sweeps, timed side by side against the floor.

For every sweep point the implementations (floor, naive, torch, triton on CUDA, peft) are
built over the same values, their saved-for-backward bytes measured, then each mode (forward,
forward+backward) is timed in interleaved rounds (see ``benchmarks.timing``). Prints a table,
writes ``<date>_<device>.csv`` / ``.json`` (and PNG plots) under ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.common import MODES, build_cases, implementations_for, mode_callable, saved_bytes_of
from benchmarks.environment import file_stem, run_metadata, torch_threads, usable_cpus
from benchmarks.plots import plot_ratios
from benchmarks.progress import progress_bar
from benchmarks.report import format_table, result_rows, write_results
from benchmarks.sweeps import SweepPlan, SweepPoint, sweep_plan
from benchmarks.timing import time_interleaved

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NOTES = (
    "Cases share one set of values per point. The torch and triton DoRA cases get the cached "
    "||W_i||^2 (peft_kernels.weight_row_sq_norm), as a real layer caches it (W is frozen); "
    "naive and peft recompute the full norm every forward. Triton is only benchmarked on CUDA."
)


@dataclass
class RunOutput:
    """What one run produced."""

    rows: list[dict[str, object]]
    metadata: dict[str, object]
    table: str
    files: list[Path] = field(default_factory=list)
    plot_note: str | None = None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="LoRA/DoRA sweeps: floor, naive, torch, triton (CUDA), peft, side by side.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few rounds (seconds)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if cuda else "cpu")
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default=None,
        help="default: bfloat16 on cuda, float32 on cpu",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=usable_cpus(),
        help="torch CPU threads (default: the CPUs this process may use)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="interleaved rounds per point and mode (default: per device)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not cuda:
        parser.error("--device cuda: no CUDA device is available")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    return args


def _measure_point(
    point: SweepPoint, plan: SweepPlan, dtype: torch.dtype, device: torch.device, bar
) -> list[dict[str, object]]:
    """Saved bytes, then forward and forward+backward timings, of every implementation."""
    spec = point.spec(dtype, str(device))
    bar.set_description(spec.label())
    cases = build_cases(spec, implementations_for(device))
    saved = saved_bytes_of(cases)
    rows: list[dict[str, object]] = []
    for mode in MODES:
        stats = time_interleaved(
            {name: mode_callable(case, mode) for name, case in cases.items()},
            device,
            repeats=plan.repeats,
            warmup=plan.warmup,
            min_sample_s=plan.min_sample_s,
            on_round=bar.update,
        )
        rows += result_rows(spec, mode, stats, saved)
    del cases
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def run(args: argparse.Namespace) -> RunOutput:
    """Run the sweep that ``args`` (from ``parse_args``) describe; write and return results."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    plan = sweep_plan(device.type, args.quick, args.repeats)
    with torch_threads(args.threads):
        metadata = run_metadata(device, dtype, torch.get_num_threads())
        metadata.update(
            quick=args.quick,
            repeats=plan.repeats,
            warmup=plan.warmup,
            implementations=implementations_for(device),
            notes=NOTES,
        )
        print(
            f"{len(plan.points)} points on {metadata['device_name']} ({device.type}), "
            f"{args.dtype}, "
            f"threads {metadata['threads']} (this process may use {metadata['usable_cpus']} "
            f"CPUs), {plan.repeats} interleaved rounds per point and mode",
            flush=True,
        )
        stem = file_stem(metadata)
        torch.manual_seed(0)
        bar = progress_bar(len(plan.points) * len(MODES) * plan.repeats, not args.no_progress)
        rows: list[dict[str, object]] = []
        files: tuple[Path, ...] = ()
        try:
            for point in plan.points:
                rows += _measure_point(point, plan, dtype, device, bar)
                # Rewritten after every point: a run cut short still leaves its results.
                files = write_results(rows, metadata, args.out, stem)
        finally:
            bar.close()
    output = RunOutput(rows, metadata, format_table(rows, metadata), files=list(files))
    if args.no_plot:
        output.plot_note = "plots skipped (--no-plot)"
    else:
        plots, output.plot_note = plot_ratios(rows, args.out, stem)
        output.files += plots
    return output


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    output = run(args)
    print(output.table)
    print()
    for path in output.files:
        print(f"wrote {path}")
    if output.plot_note:
        print(output.plot_note)
    print(f"wall time {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
