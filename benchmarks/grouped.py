"""``python -m benchmarks grouped``: the mixed-adapter layer against the one-adapter layer.

The issue's target (CUDA, bf16): with x (8192, 4096), W 4096×4096 and 16 adapters of rank 16,
the rows spread evenly over the adapters, ``mixed_lora_linear`` (triton) costs at most 1.10×
the single-adapter fused ``lora_linear`` (triton) on the same x. Forward, under ``no_grad``
(the serving case: a batch of requests for different adapters).

1. Correctness at the benchmark shape: ``mixed_lora_linear`` on ``--backend`` and on the torch
   backend, both against a float32 torch-backend reference; ``--backend``'s error must be at
   most ~2× the torch backend's (+1e-3). A failure exits with status 1.
2. Timing: the base ``F.linear`` (the floor), ``lora_linear``, ``mixed_lora_linear`` and
   ``grouped_lora_linear`` on the rows sorted by adapter and grouped once (``RowGroups``, as a
   mixed batch's layers run them; not judged against the target), timed
   in interleaved rounds (every implementation once per round, rotated; CUDA events), and the
   paired ratio mixed / lora per round: median, quartiles and range printed. A median ratio
   above ``--target`` on CUDA exits with status 4; on the CPU the target is not judged.

Without CUDA, ``--device cuda`` (the default) prints that it is skipped and exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.timing import SampleTimer, TimingStats, calibrate_inner, sample_interleaved
from peft_kernels import RowGroups, grouped_lora_linear, lora_linear, mixed_lora_linear

STATUS_WRONG = 1
STATUS_TARGET_MISSED = 4
IN_ORDER = "grouped_lora_linear (rows in order)"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks grouped",
        description="mixed_lora_linear (K adapters) vs lora_linear (one adapter), forward.",
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--in-features", type=int, default=4096)
    parser.add_argument("--out-features", type=int, default=4096)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--min-sample-s", type=float, default=0.02)
    parser.add_argument("--target", type=float, default=1.10)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser.parse_args(argv)


def make_inputs(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """Random layer and adapters; row i uses adapter ``perm[i] % K`` (evenly spread, shuffled)."""
    gen = torch.Generator().manual_seed(0)
    n, d_in, d_out, k, r = args.rows, args.in_features, args.out_features, args.adapters, args.rank

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)

    return {
        "x": rand(n, d_in),
        "weight": rand(d_out, d_in, scale=d_in**-0.5),
        "bias": rand(d_out, scale=0.1),
        "lora_A": rand(k, r, d_in, scale=d_in**-0.5),
        "lora_B": rand(k, d_out, r, scale=0.1),
        "scaling": torch.full((k,), 2.0, device=device),
        "adapter_index": (torch.randperm(n, generator=gen) % k).to(device),
    }


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def check(inputs: dict, backend: str) -> dict[str, float]:
    """Relative max errors of ``backend`` and of the torch backend against float32."""
    wide = {k: (v.float() if v.is_floating_point() else v) for k, v in inputs.items()}
    want = mixed_lora_linear(**wide, backend="torch")
    errors = {
        name: _rel_err(mixed_lora_linear(**inputs, backend=name), want)
        for name in dict.fromkeys((backend, "torch"))
    }
    order = torch.sort(inputs["adapter_index"], stable=True)
    groups = RowGroups.from_index(order.values, inputs["lora_A"].shape[0])
    factors = [inputs[k] for k in ("weight", "bias", "lora_A", "lora_B", "scaling")]
    in_order = grouped_lora_linear(inputs["x"][order.indices], *factors, groups, backend=backend)
    errors[f"{backend} in order"] = _rel_err(in_order, want[order.indices])
    return errors


def time_layers(inputs: dict, args: argparse.Namespace, device: torch.device) -> dict:
    """Stats per implementation (seconds per call) and the paired mixed / lora ratios."""
    x, weight, bias = inputs["x"], inputs["weight"], inputs["bias"]
    a0, b0 = inputs["lora_A"][0], inputs["lora_B"][0]
    s0 = float(inputs["scaling"][0])
    # a mixed batch's layers: the rows in adapter order, grouped once for every layer
    order = torch.sort(inputs["adapter_index"], stable=True)
    x_sorted, groups = x[order.indices], RowGroups.from_index(order.values, args.adapters)
    factors = [inputs[k] for k in ("lora_A", "lora_B", "scaling")]
    functions = {
        "F.linear (floor)": lambda: F.linear(x, weight, bias),
        "lora_linear": lambda: lora_linear(x, weight, bias, a0, b0, s0, backend=args.backend),
        "mixed_lora_linear": lambda: mixed_lora_linear(**inputs, backend=args.backend),
        IN_ORDER: lambda: grouped_lora_linear(
            x_sorted, weight, bias, *factors, groups, backend=args.backend
        ),
    }
    timer = SampleTimer(device)
    with torch.no_grad():
        for fn in functions.values():  # warm-up: autotuning, allocator, caches
            fn()
            fn()
        timer.synchronize()
        inner = {
            name: calibrate_inner(timer, fn, args.min_sample_s) for name, fn in functions.items()
        }
        samples = sample_interleaved(functions, device, args.rounds, inner)
    ratios = {
        name: [m / lo for m, lo in zip(samples[name], samples["lora_linear"], strict=True)]
        for name in ("mixed_lora_linear", IN_ORDER)
    }
    stats = {name: TimingStats.of(values, inner[name]) for name, values in samples.items()}
    return {"stats": stats, "ratios": ratios["mixed_lora_linear"], "in_order": ratios[IN_ORDER]}


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("grouped benchmark: skipped (CUDA is not available here)")
        return 0
    dtype = getattr(torch, args.dtype)
    inputs = make_inputs(args, device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"grouped benchmark on {name}, {args.dtype}: x ({args.rows}, {args.in_features}), "
          f"W {args.out_features}x{args.in_features}, {args.adapters} adapters r={args.rank}, "
          f"backend {args.backend}")  # fmt: skip

    errors = check(inputs, args.backend)
    bound = 2 * errors["torch"] + 1e-3
    correct = max(errors[args.backend], errors[f"{args.backend} in order"]) <= bound
    print(f"correctness vs float32: {args.backend} {errors[args.backend]:.2e} (rows grouped "
          f"once, in order: {errors[f'{args.backend} in order']:.2e}), torch "
          f"{errors['torch']:.2e} (bound {bound:.2e}): {'ok' if correct else 'WRONG'}")  # fmt: skip

    timed = time_layers(inputs, args, device)
    print("\n| implementation | median ms | IQR ms | min–max ms |")
    print("|---|---|---|---|")
    for label, st in timed["stats"].items():
        print(f"| {label} | {st.median * 1e3:.3f} | {st.iqr * 1e3:.3f} | "
              f"{st.minimum * 1e3:.3f}–{st.maximum * 1e3:.3f} |")  # fmt: skip
    ratios = timed["ratios"]
    median = statistics.median(ratios)
    q1, q3 = _quartiles(ratios)
    judged = device.type == "cuda"
    met = median <= args.target
    verdict = ("met" if met else "MISSED") if judged else "not judged off CUDA"
    print(f"\nmixed / lora (paired per round, {len(ratios)} rounds): median {median:.3f}, "
          f"IQR {q1:.3f}–{q3:.3f}, range {min(ratios):.3f}–{max(ratios):.3f}; "
          f"target <= {args.target:.2f}: {verdict}")  # fmt: skip
    in_order = timed["in_order"]
    q1, q3 = _quartiles(in_order)
    print(f"{IN_ORDER} / lora: median {statistics.median(in_order):.3f}, IQR {q1:.3f}–{q3:.3f}, "
          f"range {min(in_order):.3f}–{max(in_order):.3f} (rows grouped once, as a mixed "
          "batch's layers run them)")  # fmt: skip
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        figures = {
            "device": name,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "errors": errors,
            "correct": correct,
            "median_ms": {k: st.median * 1e3 for k, st in timed["stats"].items()},
            "ratios": ratios,
            "ratio_median": median,
            "in_order_ratios": in_order,
            "target_met": met if judged else None,
        }
        args.json.write_text(json.dumps(figures, indent=2), encoding="utf-8")
    if not correct:
        return STATUS_WRONG
    return STATUS_TARGET_MISSED if judged and not met else 0


if __name__ == "__main__":
    sys.exit(main())
