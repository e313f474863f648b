"""``python -m benchmarks moe``: LoRA on a mixture-of-experts model, ours vs peft.

A Qwen3-MoE-shaped model with random weights (``--shape cpu``: hidden 512, 16 experts, top-2,
4 layers; ``--shape gpu``: hidden 2048, 64 experts, top-8; ``--quick``: a tiny one), LoRA r=16
on the attention projections and on the experts' fused ``gate_up_proj`` / ``down_proj`` (peft's
``target_parameters``), batch ``--batch`` x ``--seq`` tokens. Variants (``moe_variants``): the
floor (no adapters, backward to the input embeddings), lightning-peft and peft holding the same
adapter values (their losses must agree).

Measured per variant:

- the training step (forward + causal-LM loss + backward + AdamW step over the adapters),
  timed in paired rounds: round k runs every variant once, in an order rotated by k; ratios
  are per round (ours / floor, ours / peft), reported as median [min-max] over the rounds;
- memory of one forward + backward (``benchmarks.memory``): what autograd saves for backward
  (distinct storages, parameters excluded) and the peak allocated above the step's start
  (CPU: the allocation events of ``torch.profiler``; CUDA: ``max_memory_allocated``). The
  optimizer state (2 floats per adapter parameter) is not in the peak: listed apart.

Writes ``<date>_<device>_moe.json`` and ``.md`` under ``--out``; a table on stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from benchmarks.environment import (
    add_run_arguments,
    check_run_arguments,
    file_stem,
    run_metadata,
    torch_threads,
)
from benchmarks.memory import measure_step_memory
from benchmarks.model_variants import make_batch, peft_installed, training_callables
from benchmarks.moe_variants import (
    ATTENTION,
    EXPERT_PARAMETERS,
    SHAPES,
    build_ours,
    build_peft,
    experts_implementation,
    load_base_model,
    materialised_delta_bytes,
    write_peft_adapter,
)
from benchmarks.progress import progress_bar
from benchmarks.timing import CLOCKS, sample_interleaved

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LOSS_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # ours vs peft, relative
MIB = 2**20
# (what, column, bound): ours' figures, per device type; each "<=".
TARGETS = {
    "cpu": (
        ("step / floor", "x_floor", 1.15),
        ("step / peft's", "x_peft", 0.8),
        ("peak beyond the floor / peft's", "peak_beyond_floor_vs_peft", 0.5),
    ),
    "cuda": (
        ("step / floor", "x_floor", 1.25),
        ("step / peft's", "x_peft", 0.8),
        ("peak beyond the floor / peft's", "peak_beyond_floor_vs_peft", 0.25),
    ),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks moe",
        description="LoRA on a Qwen3-MoE-shaped model (attention + experts): floor, "
        "lightning-peft and peft side by side.",
    )
    parser.add_argument("--shape", choices=("cpu", "gpu"), default="gpu" if cuda else "cpu")
    parser.add_argument("--quick", action="store_true", help="a tiny model, 2 rounds (tests)")
    add_run_arguments(parser, model_source=False, dtypes=DTYPES)
    parser.add_argument("--rounds", type=int, default=None, help="paired rounds (default 8)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument(
        "--experts-implementation",
        choices=("eager", "batched_mm", "grouped_mm"),
        help="transformers' experts forward (default: the one transformers selects)",
    )
    parser.add_argument("--clock", choices=CLOCKS, default="wall")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    check_run_arguments(parser, args)
    for name in ("threads", "batch", "seq", "rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.rounds is None:
        args.rounds = 2 if args.quick else 8
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.quick:
        args.shape, args.batch, args.seq = "tiny", min(args.batch, 2), min(args.seq, 16)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    return args


def paired(numerator: Sequence[float], denominator: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max) of the per-round ratios ``numerator[k] / denominator[k]``."""
    ratios = [n / d for n, d in zip(numerator, denominator, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def rows_of(
    samples: Mapping[str, list[float]],
    memory: Mapping[str, tuple[int, int]],
    parameters: Mapping[str, int],
) -> list[dict[str, object]]:
    """One row per variant: seconds, paired ratios to the floor and to peft, memory."""
    floor_saved, floor_peak = memory["floor"]
    peft = memory.get("peft")
    rows = []
    for name, times in samples.items():
        saved, peak = memory[name]
        x_floor = paired(times, samples["floor"])
        x_peft = paired(times, samples["peft"]) if "peft" in samples else (None,) * 3
        peak_beyond = peak - floor_peak
        peft_beyond = None if peft is None else peft[1] - floor_peak
        rows.append(
            {
                "implementation": name,
                "median_s": statistics.median(times),
                "min_s": min(times),
                "max_s": max(times),
                "rounds": len(times),
                "x_floor": x_floor[0],
                "x_floor_min": x_floor[1],
                "x_floor_max": x_floor[2],
                "x_peft": x_peft[0],
                "x_peft_min": x_peft[1],
                "x_peft_max": x_peft[2],
                "trainable_parameters": parameters[name],
                "saved_bytes": saved,
                "saved_beyond_floor": saved - floor_saved,
                "peak_bytes": peak,
                "peak_beyond_floor": peak_beyond,
                "peak_beyond_floor_vs_peft": (
                    peak_beyond / peft_beyond if peft_beyond and name != "floor" else None
                ),
            }
        )
    return rows


def target_lines(rows: Sequence[Mapping[str, object]], device_type: str) -> list[str]:
    ours = next((row for row in rows if row["implementation"] == "ours"), None)
    if ours is None:
        return []
    lines = []
    for what, column, bound in TARGETS.get(device_type, ()):
        value = ours.get(column)
        if value is None:
            continue
        verdict = "met" if value <= bound else "MISSED"
        lines.append(f"target: ours' {what} <= {bound:g}: {value:.3f} {verdict}")
    return lines


def _spread(row: Mapping[str, object], key: str) -> str:
    if row.get(key) is None:
        return "-"
    return f"{row[key]:.3f} [{row[f'{key}_min']:.3f}-{row[f'{key}_max']:.3f}]"


def format_table(rows: Sequence[Mapping[str, object]], metadata: Mapping[str, object]) -> str:
    m = metadata
    lines = [
        f"Qwen3-MoE shape, random weights: hidden {m['hidden']}, {m['experts']} experts "
        f"(intermediate {m['expert_intermediate']}), top-{m['top_k']}, {m['layers']} layers, "
        f"{m['parameters'] / 1e6:.1f}M parameters; experts implementation "
        f"{m['experts_implementation']}",
        f"LoRA r={m['rank']} alpha={m['alpha']:g} on {'/'.join(ATTENTION)} and the experts' "
        f"{' / '.join(p.rsplit('.', 1)[1] for p in EXPERT_PARAMETERS)}; batch "
        f"{m['batch']}x{m['seq']} tokens, {m['dtype']}, {m['device_name']}, {m['threads']} "
        f"threads, torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, "
        f"{m['date']}",
        f"{m['rounds']} paired rounds (floor, ours, peft in a rotated order), {m['clock']} clock; "
        "ratios: median [min-max] of the per-round ratios.",
        "step: forward + loss + backward + AdamW step (the floor: backward to the input "
        "embeddings, nothing to update). saved: kept for backward (parameters excluded); peak: "
        "allocated above the step's start during forward + backward.",
        "",
        "| variant | median s | × floor | × peft | saved MiB | peak MiB | peak beyond floor MiB "
        "| beyond floor / peft's |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    labels = {"floor": "floor (no adapters)", "ours": "lightning-peft", "peft": "peft"}
    for row in rows:
        ratio = row["peak_beyond_floor_vs_peft"]
        lines.append(
            f"| {labels[row['implementation']]} | {row['median_s']:.3f} | "
            f"{_spread(row, 'x_floor')} | {_spread(row, 'x_peft')} | "
            f"{row['saved_bytes'] / MIB:.1f} | {row['peak_bytes'] / MIB:.1f} | "
            f"{row['peak_beyond_floor'] / MIB:.1f} | {'-' if ratio is None else f'{ratio:.3f}'} |"
        )
    lines += ["", *m["notes"]]
    lines += target_lines(rows, str(m["device"]))
    return "\n".join(lines)


def _check_losses(losses: Mapping[str, float], dtype: torch.dtype) -> list[str]:
    """Ours and peft hold the same adapter values: their first losses must agree."""
    if "ours" not in losses or "peft" not in losses:
        return []
    ours, theirs = losses["ours"], losses["peft"]
    error = abs(ours - theirs) / max(abs(theirs), 1e-12)
    if not math.isfinite(error) or error > LOSS_TOLERANCE[dtype]:
        raise RuntimeError(
            f"lightning-peft loss {ours:.6g} != peft loss {theirs:.6g}: the two are not "
            "computing the same model, the timings would mislead"
        )
    return [f"check: loss lightning-peft {ours:.6f} = peft {theirs:.6f}"]


def run(args: argparse.Namespace) -> tuple[str, dict[str, object]]:
    """Build, measure and report; returns (table, result)."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    shape = SHAPES[args.shape]
    notes: list[str] = []
    with torch_threads(args.threads), tempfile.TemporaryDirectory() as scratch:
        base = load_base_model(shape, dtype, device, args.experts_implementation)
        base.train()
        ids = make_batch(shape.vocab, args.batch, args.seq, device)
        models = {"floor": base}
        if peft_installed():
            adapter_dir = Path(scratch) / "adapter"
            write_peft_adapter(base, args.rank, args.alpha, adapter_dir)
            ours = build_ours(base, adapter_dir)
            if isinstance(ours, str):
                notes.append(f"not measured: {ours}")
            else:
                models["ours"] = ours
            models["peft"] = build_peft(base, args.rank, args.alpha, adapter_dir)
            delta = materialised_delta_bytes(base, torch.float32)
            notes.append(
                f"peft forms ΔW = B·A of every expert on each forward: {delta / MIB:.1f} MiB "
                "per step (float32 adapters), and its gradient in backward"
            )
        else:
            notes.append("peft is not installed: the floor alone")

        metadata = run_metadata(device, dtype, torch.get_num_threads())
        metadata.update(
            {field: getattr(shape, field) for field in shape.__dataclass_fields__},
            shape=args.shape,
            parameters=sum(p.numel() for p in base.parameters()),
            experts_implementation=experts_implementation(base),
            rank=args.rank,
            alpha=args.alpha,
            batch=args.batch,
            seq=args.seq,
            rounds=args.rounds,
            clock=args.clock,
            transformers=_version("transformers"),
        )
        print(
            f"MoE benchmark: {', '.join(models)}; {args.rounds} paired rounds, {args.dtype}, "
            f"{metadata['device_name']}, {metadata['threads']} threads",
            flush=True,
        )
        bar = progress_bar(len(models) * (args.rounds + 1), not args.no_progress)
        try:
            steps, memory, losses, parameters = {}, {}, {}, {}
            for name, model in models.items():
                bar.set_description(f"memory {name}")
                forward_loss, step = training_callables(
                    model, ids, floor=name == "floor", optimize=True
                )
                adapters = [p for p in model.parameters() if p.requires_grad]
                parameters[name] = sum(p.numel() for p in adapters)

                def clear(adapters=adapters) -> None:
                    for parameter in adapters:
                        parameter.grad = None

                excluded = [*model.parameters(), *model.buffers()]
                result = measure_step_memory(forward_loss, excluded, device, clear)
                memory[name] = (result.saved_bytes, result.peak_bytes)
                losses[name] = float(step())  # also the warm-up
                steps[name] = step
                bar.update()
            notes += _check_losses(losses, dtype)
            if "ours" in parameters and parameters["ours"] != parameters["peft"]:
                raise RuntimeError(
                    f"lightning-peft trains {parameters['ours']} parameters, peft "
                    f"{parameters['peft']}: not the same adapters"
                )
            bar.set_description("training rounds")
            samples = sample_interleaved(
                steps, device, args.rounds, on_sample=lambda _: bar.update(), clock=args.clock
            )
        finally:
            bar.close()
        del models, steps, base
        gc.collect()
    if "peft" in parameters:
        adapted = parameters["peft"]
        notes.append(
            f"adapter parameters {adapted:,} ({' = '.join(n for n in parameters if n != 'floor')});"
            f" their AdamW state ({2 * adapted * 4 / MIB:.1f} MiB) is not in the peak"
        )
    metadata["notes"] = notes
    rows = rows_of(samples, memory, parameters)
    return format_table(rows, metadata), {"metadata": metadata, "rows": rows}


def _version(package: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    table, result = run(args)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{file_stem(result['metadata'])}_moe"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (args.out / f"{stem}.md").write_text(table + "\n", encoding="utf-8")
    seconds = time.perf_counter() - started
    print(f"\nwrote {args.out / stem}.json and .md; wall time {seconds:.1f} s")
    return 0
