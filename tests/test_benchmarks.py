"""The benchmark runner's ``--quick`` sweep, end to end, into a temporary folder."""

import csv
import importlib.util
import json

import pytest

from benchmarks import runner
from benchmarks.common import METHODS, MODES

pytestmark = pytest.mark.slow  # ~15 s on one thread: a whole (tiny) sweep

CPU_IMPLEMENTATIONS = {"floor", "naive", "torch", "peft"}
HAS_PEFT = importlib.util.find_spec("peft") is not None
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def quick_argv(out) -> list[str]:
    """``--quick`` on one CPU thread into ``out``, plots on when matplotlib imports."""
    argv = ["--quick", "--device", "cpu", "--threads", "1", "--out", str(out), "--no-progress"]
    if not HAS_MATPLOTLIB:
        argv.append("--no-plot")
    return argv


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One ``python -m benchmarks --quick`` run on the CPU (plots on when matplotlib imports)."""
    out = tmp_path_factory.mktemp("bench")
    output = runner.run(runner.parse_args(quick_argv(out)))
    return out, output


def _csv_rows(out):
    (path,) = out.glob("*_cpu.csv")
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed")
def test_quick_run_writes_csv_and_json_with_every_row(quick_run):
    out, output = quick_run
    rows = _csv_rows(out)
    (json_path,) = out.glob("*_cpu.json")
    data = json.loads(json_path.read_text(encoding="utf-8"))
    assert len(data["rows"]) == len(rows) == len(output.rows)
    assert data["metadata"]["threads"] == 1
    for key in ("device_name", "torch", "peft", "date"):
        assert data["metadata"][key]
    seen = {(row["method"], row["mode"], row["implementation"]) for row in rows}
    expected = {(m, mode, i) for m in METHODS for mode in MODES for i in CPU_IMPLEMENTATIONS}
    assert seen == expected  # the triton interpreter is never benchmarked
    point = ("method", "rows", "in_features", "out_features", "rank", "dropout_p", "dtype", "mode")
    floors = {tuple(r[k] for k in point): r for r in rows if r["implementation"] == "floor"}
    for row in rows:
        assert float(row["median_ms"]) > 0 and float(row["min_ms"]) > 0
        assert float(row["q1_ms"]) <= float(row["median_ms"]) <= float(row["q3_ms"])
        # the ratio is this row's median over its own sweep point's floor row, not over itself
        floor = floors[tuple(row[k] for k in point)]
        expected = float(row["median_ms"]) / float(floor["median_ms"])
        assert float(row["ratio_to_floor"]) == pytest.approx(expected, rel=1e-6)
    assert "floor" in output.table and "peft" in output.table


@pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed")
def test_torch_dora_saves_less_beyond_x_than_peft(quick_run):
    out, _ = quick_run
    beyond_x = {}  # (M, r) -> implementation -> bytes
    for row in _csv_rows(out):
        if row["method"] == "dora" and float(row["dropout_p"]) == 0:
            point = beyond_x.setdefault((row["rows"], row["rank"]), {})
            point[row["implementation"]] = int(row["saved_bytes_beyond_x"])
    assert beyond_x
    for point, saved in beyond_x.items():
        assert 0 < saved["torch"] < saved["peft"], point


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed")
def test_quick_run_draws_one_plot_per_method(quick_run):
    out, output = quick_run
    suffixes = sorted(path.name.rsplit("_", 1)[1] for path in out.glob("*.png"))
    assert suffixes == ["dora.png", "lora.png"]
    assert output.plot_note is None


@pytest.fixture(scope="module")
def quick_model_run(tmp_path_factory):
    """One ``python -m benchmarks model --quick`` run (a tiny random Llama) on the CPU."""
    from benchmarks import model

    out = tmp_path_factory.mktemp("model")
    table, files = model.run(model.parse_args(quick_argv(out)))
    (json_path,) = out.glob("*_model.json")
    return table, files, json.loads(json_path.read_text(encoding="utf-8"))


@pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed")
def test_model_benchmark_rows_and_memory(quick_model_run):
    table, files, data = quick_model_run
    rows = data["rows"]
    train = {
        (r["method"], r["dropout_p"], r["implementation"]): r for r in rows if r["kind"] == "train"
    }
    expected = {("-", 0.0, "floor")} | {
        (m, p, impl) for m in METHODS for p in (0.0, 0.05) for impl in ("ours", "peft")
    }
    assert set(train) == expected
    decode = {(r["method"], r["implementation"]) for r in rows if r["kind"] == "decode"}
    assert decode == {("-", "base"), ("lora", "ours"), ("lora", "peft"), ("lora", "merged")}
    floor_s = train["-", 0.0, "floor"]["median_s"]
    base_s = next(r["median_s"] for r in rows if r["kind"] == "decode" and r["method"] == "-")
    for row in rows:
        assert row["rounds"] == data["metadata"]["rounds"] and row["median_s"] > 0
        # the paired per-round ratios bound the ratio of the medians (an independent value)
        x, reference = ("x_floor", row["median_s"] / floor_s)
        if row["kind"] == "decode":
            x, reference = ("x_base", base_s / row["median_s"])
        assert row[f"{x}_min"] <= row[x] <= row[f"{x}_max"]
        assert row[f"{x}_min"] * (1 - 1e-9) <= reference <= row[f"{x}_max"] * (1 + 1e-9)
    assert train["-", 0.0, "floor"]["x_floor"] == 1.0
    # with dropout off, lightning-peft and peft computed the same loss (else run() raises)
    assert any("loss lightning-peft" in note for note in data["metadata"]["checks"])
    # DoRA keeps less than peft beyond the floor; the peft rows are their own reference
    dora = train["dora", 0.0, "ours"]
    assert 0 < dora["saved_beyond_floor"] < train["dora", 0.0, "peft"]["saved_beyond_floor"]
    assert dora["saved_beyond_floor_vs_peft"] == pytest.approx(
        dora["saved_beyond_floor"] / train["dora", 0.0, "peft"]["saved_beyond_floor"]
    )
    assert {path.suffix for path in files} >= {".csv", ".json"}
    assert "training step" in table and "decoding" in table and "target:" not in table
