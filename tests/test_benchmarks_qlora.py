"""``python -m benchmarks qlora`` end to end on a tiny Llama, into a temporary folder."""

import json

import pytest

from tests.helpers.quantized_models import NEEDS_BNB

pytestmark = [pytest.mark.slow, NEEDS_BNB]  # ~15 s: five models load and train


def test_qlora_benchmark_writes_its_figures(tmp_path, capsys):
    pytest.importorskip("peft")
    from benchmarks import qlora

    argv = ["--model", "tiny", "--rounds", "2", "--dora", "--threads", "1", "--out", str(tmp_path)]
    assert qlora.main(argv) == 0
    (path,) = tmp_path.glob("*_qlora.json")
    result = json.loads(path.read_text())
    memory = {row["weights"]: row["MiB"] for row in result["memory"]}
    assert memory["nf4 (double quant)"] < memory["int8"] < memory["float32"]
    assert set(result["steps"]) == {"lora-fp32", "qlora", "peft-qlora", "qdora", "peft-qdora"}
    for step in result["steps"].values():
        assert 0 < step["q1_ms"] <= step["median_ms"] <= step["q3_ms"]
    assert set(result["ratios"]) == set(qlora.RATIOS)
    kept = [row["kept"] for row in result["requantized_merge"]]
    assert kept == sorted(kept) and kept[0] < 0.5  # a small update mostly rounds away
    assert result["metadata"]["bitsandbytes"] and result["metadata"]["threads"] == 1
    assert "| QLoRA ours / peft |" in capsys.readouterr().out
