"""Rows, table, files and plot of the whole-model benchmark (``python -m benchmarks model``).

Ratios are *paired*: round k's sample of an implementation is divided by round k's sample of
the floor (training) or of the base model (decoding), both timed minutes apart at most in the
same process; the table gives the median of those per-round ratios and their min–max.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from benchmarks.environment import write_csv_json

MIB = 2**20
METHOD_NAMES = {"lora": "LoRA", "dora": "DoRA", "-": "-"}
TRAIN_FIELDS = (
    "kind",
    "method",
    "dropout_p",
    "implementation",
    "median_s",
    "min_s",
    "max_s",
    "rounds",
    "x_floor",
    "x_floor_min",
    "x_floor_max",
    "x_peft",
    "x_peft_min",
    "x_peft_max",
    "saved_bytes",
    "saved_vs_peft",
    "saved_beyond_floor",
    "saved_beyond_floor_vs_peft",
    "peak_bytes",
    "peak_vs_peft",
    "tokens_per_s",
    "tokens_per_s_min",
    "tokens_per_s_max",
    "x_base",
    "x_base_min",
    "x_base_max",
)
METADATA_FIELDS = ("date", "device_name", "dtype", "threads", "clock", "torch", "peft", "model")


def paired(numerator: Sequence[float], denominator: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max) of the per-round ratios ``numerator[k] / denominator[k]``."""
    ratios = [n / d for n, d in zip(numerator, denominator, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def train_rows(
    samples: Mapping[str, list[float]],
    keys: Mapping[str, tuple[str, float, str]],
    memory: Mapping[str, tuple[int, int]],
) -> list[dict[str, object]]:
    """One row per training variant.

    Args:
        samples: variant key -> seconds per round (paired by index); must hold ``"floor"``.
        keys: variant key -> (method, dropout_p, implementation); the floor's method is "-".
        memory: variant key -> (saved bytes, peak bytes).
    """
    floor = samples["floor"]
    floor_saved = memory["floor"][0]
    peft_of = {(method, p): key for key, (method, p, impl) in keys.items() if impl == "peft"}
    rows = []
    for key, times in samples.items():
        method, p, impl = keys[key]
        x_floor = paired(times, floor)
        peft_key = peft_of.get((method, p))
        x_peft = paired(times, samples[peft_key]) if peft_key else (None, None, None)
        saved, peak = memory[key]
        peft_memory = memory[peft_key] if peft_key else (None, None)
        peft_beyond = None if peft_key is None else peft_memory[0] - floor_saved
        rows.append(
            {
                "kind": "train",
                "method": method,
                "dropout_p": p,
                "implementation": impl,
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
                "saved_bytes": saved,
                "saved_vs_peft": _ratio(saved, peft_memory[0]),
                "saved_beyond_floor": saved - floor_saved,
                "saved_beyond_floor_vs_peft": _ratio(saved - floor_saved, peft_beyond),
                "peak_bytes": peak,
                "peak_vs_peft": _ratio(peak, peft_memory[1]),
            }
        )
    return rows


def decode_rows(
    samples: Mapping[str, list[float]],
    keys: Mapping[str, tuple[str, str]],
    new_tokens: int,
) -> list[dict[str, object]]:
    """One row per decoding variant (``samples`` must hold ``"base"``); tokens/s = n / time."""
    base = samples["base"]
    peft_of = {method: key for key, (method, impl) in keys.items() if impl == "peft"}
    rows = []
    for key, times in samples.items():
        method, impl = keys[key]
        rate = [new_tokens / t for t in times]
        x_base = paired(base, times)  # tokens/s ratio = inverse time ratio
        peft_key = peft_of.get(method)
        x_peft = paired(samples[peft_key], times) if peft_key else (None, None, None)
        rows.append(
            {
                "kind": "decode",
                "method": method,
                "implementation": impl,
                "median_s": statistics.median(times),
                "min_s": min(times),
                "max_s": max(times),
                "rounds": len(times),
                "tokens_per_s": statistics.median(rate),
                "tokens_per_s_min": min(rate),
                "tokens_per_s_max": max(rate),
                "x_base": x_base[0],
                "x_base_min": x_base[1],
                "x_base_max": x_base[2],
                "x_peft": x_peft[0],
                "x_peft_min": x_peft[1],
                "x_peft_max": x_peft[2],
            }
        )
    return rows


# (what, kind, method, dropout_p, implementation, column, bound, "<=" | ">="), per device type.
# Time ratios are medians of paired rounds; memory ratios are of the saved bytes beyond the floor.
TARGETS = {
    "cpu": (
        ("LoRA step / floor", "train", "lora", 0.0, "ours", "x_floor", 1.10, "<="),
        ("LoRA step / peft's", "train", "lora", 0.0, "ours", "x_peft", 0.95, "<="),
        ("DoRA step / floor", "train", "dora", 0.0, "ours", "x_floor", 1.18, "<="),
        ("DoRA step / peft's", "train", "dora", 0.0, "ours", "x_peft", 0.80, "<="),
        (
            "DoRA saved beyond the floor / peft's",
            "train",
            "dora",
            0.0,
            "ours",
            "saved_beyond_floor_vs_peft",
            0.45,
            "<=",
        ),
        (
            "LoRA p=0.05 saved beyond the floor / peft's",
            "train",
            "lora",
            0.05,
            "ours",
            "saved_beyond_floor_vs_peft",
            0.5,
            "<=",
        ),
        (
            "unmerged LoRA decoding / base model",
            "decode",
            "lora",
            None,
            "ours",
            "x_base",
            0.9,
            ">=",
        ),
        ("unmerged LoRA decoding / peft's", "decode", "lora", None, "ours", "x_peft", 1.0, ">="),
    ),
    "cuda": (
        ("LoRA step / floor", "train", "lora", 0.0, "ours", "x_floor", 1.08, "<="),
        ("DoRA step / floor", "train", "dora", 0.0, "ours", "x_floor", 1.12, "<="),
    ),
}


def target_lines(rows: Sequence[Mapping[str, object]], device_type: str) -> list[str]:
    """One line per target of ``device_type`` found in ``rows``: the bound, the figure, met?"""
    lines = []
    for what, kind, method, p, impl, column, bound, sense in TARGETS.get(device_type, ()):
        found = [
            r
            for r in rows
            if r["kind"] == kind
            and r["method"] == method
            and r["implementation"] == impl
            and (p is None or float(r["dropout_p"]) == p)
        ]
        if not found or found[0].get(column) is None:
            continue
        value = float(found[0][column])
        met = value <= bound if sense == "<=" else value >= bound
        lines.append(f"target: {what} {sense} {bound:g}: {value:.3f} {'met' if met else 'MISSED'}")
    return lines


def _num(value: object, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _spread(row: Mapping[str, object], prefix: str, digits: int = 3) -> str:
    if row.get(prefix) is None:
        return "-"
    low, high = row[f"{prefix}_min"], row[f"{prefix}_max"]
    return f"{row[prefix]:.{digits}f} [{low:.{digits}f}-{high:.{digits}f}]"


IMPL_LABELS = {
    "floor": "floor",
    "ours": "lightning-peft",
    "peft": "peft",
    "base": "base model",
    "merged": "merged",
}


def format_table(rows: Sequence[Mapping[str, object]], metadata: Mapping[str, object]) -> str:
    """The training table, then the decoding table; ratios as median [min-max] of rounds."""
    lines = [
        f"{metadata['model']}: {metadata['parameters'] / 1e6:.1f}M parameters, "
        f"{metadata['adapted_modules']} adapted linear layers (r={metadata['rank']}, "
        f"alpha={metadata['alpha']:g}); batch {metadata['batch']}x{metadata['seq']} tokens, "
        f"{metadata['dtype']}, {metadata['device_name']}, {metadata['threads']} threads, "
        f"torch {metadata['torch']}, peft {metadata['peft']}, {metadata['date']}",
        f"{metadata['rounds']} paired rounds, interleaved in a rotated order, {metadata['clock']} "
        "clock; ratios are the median [min-max] of the per-round ratios.",
        "saved: tensors kept for backward (shared storages once, parameters excluded); >floor: "
        "what the adapters add to the floor's; peak: allocated above the step's start.",
    ]
    train = [row for row in rows if row["kind"] == "train"]
    if train:
        lines += [
            "",
            "training step (forward + causal-LM loss + backward)",
            f"  {'adapter':<12}{'impl':<16}{'median s':>9}  {'x floor':<24}{'x peft':<24}"
            f"{'saved MiB':>11}{'/peft':>7}{'>floor':>8}{'/peft':>7}{'peak MiB':>10}{'/peft':>7}",
        ]
    for row in train:
        adapter = (
            "-" if row["method"] == "-" else f"{METHOD_NAMES[row['method']]} p={row['dropout_p']:g}"
        )
        beyond = row["saved_beyond_floor"] / MIB
        lines.append(
            f"  {adapter:<12}{IMPL_LABELS[row['implementation']]:<16}"
            f"{row['median_s']:>9.3f}  {_spread(row, 'x_floor'):<24}{_spread(row, 'x_peft'):<24}"
            f"{row['saved_bytes'] / MIB:>11.1f}{_num(row['saved_vs_peft'], 3):>7}"
            f"{beyond:>8.1f}{_num(row['saved_beyond_floor_vs_peft'], 3):>7}"
            f"{row['peak_bytes'] / MIB:>10.1f}{_num(row['peak_vs_peft'], 3):>7}"
        )
    decode = [row for row in rows if row["kind"] == "decode"]
    if decode:
        lines += [
            "",
            f"decoding (generate {metadata['new_tokens']} new tokens after a "
            f"{metadata['prompt_tokens']}-token prompt, batch 1, greedy)",
            f"  {'adapter':<12}{'impl':<16}{'tokens/s':<26}{'x base':<24}{'x peft':<24}",
        ]
        for row in decode:
            adapter = "-" if row["method"] == "-" else METHOD_NAMES[row["method"]]
            lines.append(
                f"  {adapter:<12}{IMPL_LABELS[row['implementation']]:<16}"
                f"{_spread(row, 'tokens_per_s', 2):<26}{_spread(row, 'x_base'):<24}"
                f"{_spread(row, 'x_peft')}"
            )
    for note in metadata.get("checks", []):
        lines.append(f"check: {note}")
    if metadata.get("targets", True):
        lines += target_lines(rows, str(metadata["device"]))
    return "\n".join(lines)


def write_files(
    rows: Sequence[Mapping[str, object]], metadata: Mapping[str, object], out: Path, stem: str
) -> list[Path]:
    """``<stem>.csv`` (one line per row, run metadata repeated) and ``<stem>.json``."""
    return list(write_csv_json(rows, metadata, out, stem, TRAIN_FIELDS, METADATA_FIELDS))


def plot(
    rows: Sequence[Mapping[str, object]], metadata: Mapping[str, object], out: Path, stem: str
) -> tuple[list[Path], str | None]:
    """``<stem>.png``: step time / floor (left) and decoding tokens/s (right), min-max bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed: no plot"
    train = [r for r in rows if r["kind"] == "train" and r["implementation"] != "floor"]
    decode = [r for r in rows if r["kind"] == "decode"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
    configs = sorted({(str(r["method"]), float(r["dropout_p"])) for r in train})
    impls = [i for i in ("ours", "peft") if any(r["implementation"] == i for r in train)]
    width = 0.8 / max(len(impls), 1)
    for index, impl in enumerate(impls):
        xs, ys, low, high = [], [], [], []
        for position, config in enumerate(configs):
            found = [
                r
                for r in train
                if (r["method"], float(r["dropout_p"])) == config and r["implementation"] == impl
            ]
            if found:
                row = found[0]
                xs.append(position + (index - (len(impls) - 1) / 2) * width)
                ys.append(row["x_floor"])
                low.append(row["x_floor"] - row["x_floor_min"])
                high.append(row["x_floor_max"] - row["x_floor"])
        left.bar(xs, ys, width, yerr=[low, high], capsize=3, label=IMPL_LABELS[impl])
    left.axhline(1.0, color="grey", linewidth=1, label="floor (no adapters)")
    left.set_xticks(range(len(configs)), [f"{METHOD_NAMES[m]} p={p:g}" for m, p in configs])
    left.set_ylim(bottom=0.9)
    left.set_ylabel("training step / floor (paired rounds)")
    left.set_title(
        f"{metadata['model']}, batch {metadata['batch']}x{metadata['seq']}, {metadata['dtype']}",
        fontsize=9,
    )
    left.legend(fontsize=8)
    if decode:
        labels = [f"{IMPL_LABELS[r['implementation']]}" for r in decode]
        labels = [
            label if r["method"] == "-" else f"{METHOD_NAMES[r['method']]} {label}"
            for label, r in zip(labels, decode, strict=True)
        ]
        rates = [r["tokens_per_s"] for r in decode]
        errors = [
            [r["tokens_per_s"] - r["tokens_per_s_min"] for r in decode],
            [r["tokens_per_s_max"] - r["tokens_per_s"] for r in decode],
        ]
        right.bar(range(len(decode)), rates, yerr=errors, capsize=3, color="C2")
        right.set_xticks(range(len(decode)), labels, fontsize=8)
        right.set_ylabel("tokens/s")
        right.set_title(f"generate {metadata['new_tokens']} new tokens, batch 1", fontsize=9)
    else:
        right.set_axis_off()
    figure.tight_layout()
    path = out / f"{stem}.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return [path], None
