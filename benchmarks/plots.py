"""PNG plots of the ratio to the floor: against the rank and against M, one file per method.

matplotlib is optional: ``plot_ratios`` returns no paths and a note when it does not import.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from benchmarks.common import IMPLEMENTATIONS
from benchmarks.report import MODE_LABELS

Row = Mapping[str, object]
LINESTYLES = {"forward": "-", "forward_backward": "--"}
AXIS_LABELS = {"rank": "rank r", "rows": "M (rows of x)"}


def _widest_series(rows: Sequence[Row], varied: str, fixed: tuple[str, ...]) -> list[Row]:
    """The rows of the fixed-key group in which ``varied`` takes the most values (>= 2)."""
    groups: dict[tuple[object, ...], list[Row]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[key] for key in fixed)].append(row)
    best = max(groups.values(), key=lambda group: len({row[varied] for row in group}), default=[])
    return best if len({row[varied] for row in best}) >= 2 else []


def _draw(axes, rows: Sequence[Row], varied: str, title: str) -> None:
    axes.axhline(1.0, color="grey", linewidth=1, label="floor (frozen nn.Linear)")
    series: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for row in rows:
        if row["implementation"] != "floor":
            key = (str(row["implementation"]), str(row["mode"]))
            series[key].append((float(row[varied]), float(row["ratio_to_floor"])))
    for (implementation, mode), points in sorted(series.items()):
        points.sort()
        color = f"C{IMPLEMENTATIONS.index(implementation)}"
        axes.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            LINESTYLES.get(mode, ":"),
            marker="o",
            color=color,
            label=f"{implementation} {MODE_LABELS.get(mode, mode)}",
        )
    axes.set_xscale("log", base=2)
    ticks = sorted({float(row[varied]) for row in rows})
    axes.set_xticks(ticks, [f"{tick:g}" for tick in ticks])
    axes.minorticks_off()
    axes.set_xlabel(AXIS_LABELS[varied])
    axes.set_ylabel("median time / floor median")
    axes.set_title(title, fontsize=9)
    axes.grid(True, alpha=0.3)


def plot_ratios(rows: Sequence[Row], out_dir: Path, stem: str) -> tuple[list[Path], str | None]:
    """``<stem>_<method>.png`` per method: ratio to floor vs rank (left) and vs M (right).

    Only dropout-free rows are drawn. Returns the files written and a note when none could be.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed: no plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for method in sorted({str(row["method"]) for row in rows}):
        plain = [row for row in rows if row["method"] == method and float(row["dropout_p"]) == 0]
        by_rank = _widest_series(plain, "rank", ("rows", "in_features", "out_features"))
        by_rows = _widest_series(plain, "rows", ("rank", "in_features", "out_features"))
        if not by_rank and not by_rows:
            continue
        figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
        for axes, series, varied in ((left, by_rank, "rank"), (right, by_rows, "rows")):
            if not series:
                axes.set_axis_off()
                continue
            first = series[0]
            fixed = (
                f"M={first['rows']}" if varied == "rank" else f"r={first['rank']}"
            ) + f", {first['in_features']}x{first['out_features']}, {first['dtype']}"
            _draw(axes, series, varied, f"{method.upper()} vs {varied} ({fixed})")
        (left if by_rank else right).legend(fontsize=7)
        figure.tight_layout()
        path = out_dir / f"{stem}_{method}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        paths.append(path)
    return paths, None if paths else "not enough points to plot"
