"""Result rows, the printed table, and the CSV / JSON files.

One row per (sweep point, mode, implementation). Ratios are taken between medians of the
same interleaved run: ``ratio_to_floor = median(impl) / median(floor)``,
``ratio_to_peft = median(impl) / median(peft)`` and ``overhead_vs_peft =
(median(impl) − median(floor)) / (median(peft) − median(floor))`` (the share of peft's cost
above the floor that the implementation still pays).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from benchmarks.common import CaseSpec, SavedBytes
from benchmarks.environment import write_csv_json
from benchmarks.timing import TimingStats

MIB = 2**20
MODE_LABELS = {"forward": "fwd", "forward_backward": "fwd+bwd"}

FIELDS = (
    "method",
    "rows",
    "in_features",
    "out_features",
    "rank",
    "dropout_p",
    "dtype",
    "device",
    "mode",
    "implementation",
    "median_ms",
    "q1_ms",
    "q3_ms",
    "min_ms",
    "max_ms",
    "repeats",
    "inner",
    "ratio_to_floor",
    "ratio_to_peft",
    "overhead_vs_peft",
    "saved_bytes",
    "saved_bytes_beyond_x",
    "saved_beyond_x_vs_peft",
)
# Run metadata repeated on every CSV line, so that a CSV file stands on its own.
METADATA_FIELDS = ("date", "device_name", "threads", "torch", "triton", "peft")


def _ratio(numerator: float, denominator: float | None) -> float | None:
    if denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def result_rows(
    spec: CaseSpec,
    mode: str,
    stats: Mapping[str, TimingStats],
    saved: Mapping[str, SavedBytes],
) -> list[dict[str, object]]:
    """The rows of one sweep point and mode (``stats`` must include ``floor``)."""
    floor = stats["floor"].median
    peft = stats["peft"].median if "peft" in stats else None
    peft_saved = saved["peft"].beyond_x if "peft" in saved else None
    rows = []
    for name, timing in stats.items():
        overhead = None
        if name != "floor" and peft is not None:
            overhead = _ratio(timing.median - floor, peft - floor)
        rows.append(
            {
                "method": spec.method,
                "rows": spec.rows,
                "in_features": spec.in_features,
                "out_features": spec.out_features,
                "rank": spec.rank,
                "dropout_p": spec.dropout_p,
                "dtype": str(spec.dtype).removeprefix("torch."),
                "device": spec.device,
                "mode": mode,
                "implementation": name,
                "median_ms": timing.median * 1e3,
                "q1_ms": timing.q1 * 1e3,
                "q3_ms": timing.q3 * 1e3,
                "min_ms": timing.minimum * 1e3,
                "max_ms": timing.maximum * 1e3,
                "repeats": timing.repeats,
                "inner": timing.inner,
                "ratio_to_floor": timing.median / floor,
                "ratio_to_peft": _ratio(timing.median, peft),
                "overhead_vs_peft": overhead,
                "saved_bytes": saved[name].total,
                "saved_bytes_beyond_x": saved[name].beyond_x,
                "saved_beyond_x_vs_peft": _ratio(saved[name].beyond_x, peft_saved),
            }
        )
    return rows


def _num(value: object, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _point_title(row: Mapping[str, object]) -> str:
    return (
        f"{str(row['method']).upper()}  M={row['rows']}  in={row['in_features']} "
        f"out={row['out_features']}  r={row['rank']}  dropout={row['dropout_p']:g}  "
        f"{row['dtype']} {row['device']}"
    )


_HEADER = (
    f"  {'mode':<8}{'impl':<8}{'median ms':>11}{'IQR ms':>9}{'xfloor':>8}{'xpeft':>7}"
    f"{'ovh/peft':>9}{'saved MiB':>11}{'>x MiB':>9}{'>x /peft':>9}"
)


def format_table(rows: Sequence[Mapping[str, object]], metadata: Mapping[str, object]) -> str:
    """A text table: one block per sweep point, a line per mode and implementation."""
    lines = [
        f"device: {metadata['device_name']} ({metadata['device']}), dtype {metadata['dtype']}, "
        f"threads {metadata['threads']}, torch {metadata['torch']}, triton {metadata['triton']}, "
        f"peft {metadata['peft']}, {metadata['date']}",
        "xfloor = median(impl)/median(floor), xpeft = median(impl)/median(peft), "
        "ovh/peft = (impl-floor)/(peft-floor),",
        ">x = saved for backward beyond x (parameters excluded); torch/triton DoRA get the "
        "cached ||W_i||^2.",
    ]
    title = None
    for row in rows:
        if _point_title(row) != title:
            title = _point_title(row)
            lines += ["", title, _HEADER]
        iqr = float(row["q3_ms"]) - float(row["q1_ms"])
        lines.append(
            f"  {MODE_LABELS[str(row['mode'])]:<8}{row['implementation']!s:<8}"
            f"{_num(row['median_ms'], 2):>11}{_num(iqr, 2):>9}{_num(row['ratio_to_floor'], 3):>8}"
            f"{_num(row['ratio_to_peft'], 2):>7}{_num(row['overhead_vs_peft'], 2):>9}"
            f"{_num(int(row['saved_bytes']) / MIB, 2):>11}"
            f"{_num(int(row['saved_bytes_beyond_x']) / MIB, 2):>9}"
            f"{_num(row['saved_beyond_x_vs_peft'], 2):>9}"
        )
    return "\n".join(lines)


def write_results(
    rows: Sequence[Mapping[str, object]],
    metadata: Mapping[str, object],
    out_dir: Path,
    stem: str,
) -> tuple[Path, Path]:
    """``<stem>.csv`` and ``<stem>.json`` in ``out_dir``.

    The CSV has one line per row, with ``METADATA_FIELDS`` repeated on each; the JSON holds
    ``{"metadata": ..., "rows": [...]}``.
    """
    return write_csv_json(rows, metadata, out_dir, stem, FIELDS, METADATA_FIELDS)
