"""``python -m benchmarks mixed`` end to end on a tiny Llama, into a temporary folder; its
argument checks and the logit check that guards its timings."""

import importlib.util
import json

import pytest
import torch

from benchmarks import mixed
from benchmarks.mixed_report import COMPARISONS
from benchmarks.mixed_variants import row_names

HAS_PEFT = importlib.util.find_spec("peft") is not None
NEEDS_PEFT = pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed")


@pytest.fixture(scope="module")
def quick_mixed_run(tmp_path_factory):
    """One ``python -m benchmarks mixed --quick`` run (a tiny random Llama, 2 rounds)."""
    out = tmp_path_factory.mktemp("mixed")
    argv = ["--quick", "--device", "cpu", "--threads", "1", "--out", str(out), "--no-progress"]
    table, files = mixed.run(mixed.parse_args(argv))
    (json_path,) = out.glob("*_mixed.json")
    return table, files, json.loads(json_path.read_text(encoding="utf-8"))


@pytest.mark.slow  # ~10 s: three models, three parts
@NEEDS_PEFT
def test_mixed_benchmark_rows_ratios_and_checks(quick_mixed_run):
    table, files, data = quick_mixed_run
    metadata, rows = data["metadata"], data["rows"]
    counts = metadata["adapter_counts"]
    assert counts == [1, 4, 16] and metadata["threads"] == 1
    assert metadata["rounds"] == {"forward": 2, "generate": 2, "train": 2}
    times = {(r["part"], r["name"]): r for r in rows if r["kind"] == "time"}
    expected = {("forward", "ours single"), ("forward", "peft single"), ("train", "ours single")}
    for count in counts:
        expected |= {
            (part, f"{impl} mixed {count}")
            for part in ("forward", "generate")
            for impl in ("ours", "peft")
        }
        expected.add(("train", f"ours mixed {count}"))
    assert set(times) == expected  # peft never trains a mixed batch
    ratios = [r for r in rows if r["kind"] == "ratio"]
    assert {(r["part"], r["name"]) for r in ratios} == {(c[0], c[1]) for c in COMPARISONS}
    for row in ratios:
        assert row["rounds"] == 2 and row["ratio_min"] <= row["ratio"] <= row["ratio_max"]
        _, _, top, bottom = next(c for c in COMPARISONS if c[:2] == (row["part"], row["name"]))
        top, bottom = (key.format(k=row["adapters"]) for key in (top, bottom))
        # the ratio of the two medians (of 2 rounds: means) lies within the paired ratios
        reference = times[row["part"], top]["median_s"] / times[row["part"], bottom]["median_s"]
        assert row["ratio_min"] * (1 - 1e-9) <= reference <= row["ratio_max"] * (1 + 1e-9)
    # the logits of ours and peft agreed (else run() raises) for one and for 16 adapters
    checks = metadata["checks"]
    assert sum("logits lightning-peft = peft" in note for note in checks) == 2
    assert "training mode" in metadata["peft_train_refusal"]
    assert "peft mixed: cannot train" in table and "target:" not in table
    assert {path.suffix for path in files} == {".csv", ".json"}


def test_rows_are_spread_round_robin_and_counts_need_rows():
    assert row_names(6, 4) == ["a0", "a1", "a2", "a3", "a0", "a1"]
    assert row_names(4, 1) == ["a0"] * 4
    with pytest.raises(ValueError, match="16 adapters need at least 16 rows"):
        row_names(8, 16)


@NEEDS_PEFT
def test_rounds_per_part():
    assert mixed.parse_args(["--parts", "train", "forward"]).rounds == {"train": 5, "forward": 9}
    assert mixed.parse_args(["--rounds", "7"]).rounds == dict.fromkeys(mixed.PARTS, 7)


@NEEDS_PEFT
def test_more_adapters_than_rows_is_refused_before_loading(capsys):
    with pytest.raises(SystemExit):
        mixed.parse_args(["--random-weights", "--batch", "8", "--adapters", "4", "16"])
    assert "--adapters 16 needs at least that many rows: --batch 8" in capsys.readouterr().err


def test_logits_that_differ_stop_the_run():
    theirs = torch.randn(2, 3, 5)
    assert "lightning-peft = peft" in mixed._check_logits("x", theirs + 1e-7, theirs, torch.float32)
    with pytest.raises(RuntimeError, match="not computing the same model"):
        mixed._check_logits("x", theirs + 1e-2, theirs, torch.float32)
