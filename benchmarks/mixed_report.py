"""Rows, table, targets and files of the mixed-adapter benchmark (``python -m benchmarks mixed``).

Two kinds of rows: ``time`` (one per part and variant: seconds per call over the rounds) and
``ratio`` (one per comparison and adapter count: the median [min-max] of the per-round ratios
``numerator[k] / denominator[k]``, paired by round).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from benchmarks.environment import write_csv_json
from benchmarks.model_report import paired

PARTS = {
    "forward": "forward without grad (all logits)",
    "train": "training step (forward + causal-LM loss + backward + AdamW step)",
    "generate": "generate, greedy",
}
# (part, comparison, numerator, denominator); "{k}" stands for the adapter count. A variant's
# key is "<implementation> single" or "<implementation> mixed {k}".
COMPARISONS = (
    ("forward", "ours mixed / ours single", "ours mixed {k}", "ours single"),
    ("forward", "ours mixed / peft mixed", "ours mixed {k}", "peft mixed {k}"),
    ("forward", "peft mixed / peft single", "peft mixed {k}", "peft single"),
    ("forward", "ours single / peft single", "ours single", "peft single"),
    ("train", "ours mixed / ours single", "ours mixed {k}", "ours single"),
    ("generate", "ours mixed / peft mixed", "ours mixed {k}", "peft mixed {k}"),
)
# (part, comparison, adapter count or None for every count, bound): time ratios, "<=" bound.
TARGETS = (
    ("forward", "ours mixed / ours single", 16, 1.08),
    ("forward", "ours mixed / peft mixed", 16, 0.85),
    ("train", "ours mixed / ours single", 16, 1.12),
    ("generate", "ours mixed / peft mixed", None, 1.0),
)
FIELDS = (
    "kind",
    "part",
    "adapters",
    "name",
    "median_s",
    "min_s",
    "max_s",
    "ratio",
    "ratio_min",
    "ratio_max",
    "rounds",
)
METADATA_FIELDS = ("date", "device_name", "dtype", "threads", "clock", "torch", "peft", "model")


def time_rows(part: str, samples: Mapping[str, list[float]]) -> list[dict[str, object]]:
    """One ``time`` row per variant of ``part``."""
    rows = []
    for key, times in samples.items():
        rows.append(
            {
                "kind": "time",
                "part": part,
                "adapters": _count_of(key),
                "name": key,
                "median_s": statistics.median(times),
                "min_s": min(times),
                "max_s": max(times),
                "rounds": len(times),
            }
        )
    return rows


def _count_of(key: str) -> int | None:
    last = key.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else None


def ratio_rows(
    part: str, samples: Mapping[str, list[float]], counts: Sequence[int]
) -> list[dict[str, object]]:
    """One ``ratio`` row per comparison of ``part`` whose two variants were both timed."""
    rows = []
    for comparison_part, name, numerator, denominator in COMPARISONS:
        if comparison_part != part:
            continue
        per_count = "{k}" in numerator or "{k}" in denominator
        for count in counts if per_count else (None,):
            top, bottom = (key.format(k=count) for key in (numerator, denominator))
            if top not in samples or bottom not in samples:
                continue
            ratio, low, high = paired(samples[top], samples[bottom])
            rows.append(
                {
                    "kind": "ratio",
                    "part": part,
                    "adapters": count,
                    "name": name,
                    "ratio": ratio,
                    "ratio_min": low,
                    "ratio_max": high,
                    "rounds": len(samples[top]),
                }
            )
    return rows


def target_lines(rows: Sequence[Mapping[str, object]]) -> list[str]:
    """One line per target found in ``rows``: the bound, the figure, met or MISSED."""
    lines = []
    for part, name, count, bound in TARGETS:
        for row in rows:
            if row["kind"] != "ratio" or row["part"] != part or row["name"] != name:
                continue
            if count is not None and row["adapters"] != count:
                continue
            met = row["ratio"] <= bound
            lines.append(
                f"target: {part} {name}, {row['adapters']} adapters <= {bound:g}: "
                f"{row['ratio']:.3f} {'met' if met else 'MISSED'}"
            )
    return lines


def _spread(row: Mapping[str, object]) -> str:
    return f"{row['ratio']:.3f} [{row['ratio_min']:.3f}-{row['ratio_max']:.3f}]"


def format_table(rows: Sequence[Mapping[str, object]], metadata: Mapping[str, object]) -> str:
    """Per part: the ratio rows by adapter count, then the median seconds of every variant."""
    counts = list(metadata["adapter_counts"])
    lines = [
        f"{metadata['model']}: {metadata['adapted_modules']} adapted linear layers "
        f"(LoRA r={metadata['rank']}, alpha={metadata['alpha']:g}) per adapter; "
        f"batch {metadata['batch']}x{metadata['seq']} tokens, rows spread evenly (round robin) "
        f"over k adapters; {metadata['dtype']}, {metadata['device_name']}, "
        f"{metadata['threads']} threads, torch {metadata['torch']}, peft {metadata['peft']}, "
        f"{metadata['date']}",
        "paired rounds per part "
        + ", ".join(f"{part} {count}" for part, count in metadata["rounds"].items())
        + f", interleaved in a rotated order, {metadata['clock']} clock; ratios of times are the "
        "median [min-max] of the per-round ratios (below 1: the first is faster).",
    ]
    width = 28
    for part, title in PARTS.items():
        ratios = [r for r in rows if r["kind"] == "ratio" and r["part"] == part]
        times = [r for r in rows if r["kind"] == "time" and r["part"] == part]
        if not ratios and not times:
            continue
        if part == "generate":
            title += (
                f", {metadata['new_tokens']} new tokens after a "
                f"{metadata['batch']}x{metadata['prompt_tokens']}-token prompt"
            )
        header = "".join(f"{f'k={k}':<{width}}" for k in counts)
        lines += ["", title, f"  {'time ratio':<28}{header}"]
        for name in dict.fromkeys(r["name"] for r in ratios):
            cells = []
            for count in counts:
                found = [r for r in ratios if r["name"] == name and r["adapters"] in (count, None)]
                cells.append(_spread(found[0]) if found else "-")
            if all(r["adapters"] is None for r in ratios if r["name"] == name):
                cells = [cells[0]] + [""] * (len(counts) - 1)
            lines.append(f"  {name:<28}" + "".join(f"{cell:<{width}}" for cell in cells))
        if part == "train" and metadata.get("peft_train_refusal"):
            lines.append(f"  peft mixed: cannot train, it raises: {metadata['peft_train_refusal']}")
        lines.append("  median s: " + ", ".join(f"{r['name']} {r['median_s']:.3f}" for r in times))
    for note in metadata.get("checks", []):
        lines.append(f"check: {note}")
    if metadata.get("targets", True):
        lines += target_lines(rows)
    return "\n".join(lines)


def write_files(
    rows: Sequence[Mapping[str, object]], metadata: Mapping[str, object], out: Path, stem: str
) -> list[Path]:
    """``<stem>.csv`` (one line per row, run metadata repeated) and ``<stem>.json``."""
    return list(write_csv_json(rows, metadata, out, stem, FIELDS, METADATA_FIELDS))
