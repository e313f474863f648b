"""``python -m benchmarks grouped``: its CPU-safe part (tiny shapes, torch backend) end to end,
and the clean skip of its CUDA default where there is no GPU."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks import grouped


def test_grouped_benchmark_cpu(tmp_path, capsys):
    out = tmp_path / "grouped.json"
    argv = ["--device", "cpu", "--dtype", "float32", "--backend", "torch", "--rows", "40",
            "--in-features", "24", "--out-features", "20", "--adapters", "3", "--rank", "4",
            "--rounds", "3", "--min-sample-s", "0", "--json", str(out)]  # fmt: skip
    assert grouped.main(argv) == 0
    figures = json.loads(out.read_text())
    assert figures["correct"] and figures["errors"]["torch"] < 1e-6
    assert figures["errors"]["torch in order"] < 1e-6  # grouped once, rows sorted by adapter
    assert len(figures["ratios"]) == 3 and all(r > 0 for r in figures["ratios"])
    assert len(figures["in_order_ratios"]) == 3 and all(r > 0 for r in figures["in_order_ratios"])
    assert figures["target_met"] is None  # not judged off CUDA
    printed = capsys.readouterr().out
    assert "| mixed_lora_linear |" in printed and "not judged off CUDA" in printed
    assert "| grouped_lora_linear (rows in order) |" in printed


def test_grouped_inputs_spread_rows_evenly():
    args = grouped.parse_args(["--rows", "48", "--adapters", "4", "--in-features", "8",
                               "--out-features", "8"])  # fmt: skip
    idx = grouped.make_inputs(args, torch.device("cpu"), torch.float32)["adapter_index"]
    assert torch.bincount(idx).tolist() == [12, 12, 12, 12] and not torch.equal(idx, idx.sort()[0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip without CUDA")
def test_grouped_benchmark_skips_without_cuda(capsys):
    assert grouped.main([]) == 0
    assert "skipped" in capsys.readouterr().out


def test_gpu_check_script_parses():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    assert "benchmarks grouped" in script.read_text()
    subprocess.run(["bash", "-n", str(script)], check=True)
