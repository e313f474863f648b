"""``python -m benchmarks moe --quick`` end to end on a tiny Qwen3-MoE, into a temporary folder."""

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from benchmarks import moe
from benchmarks.moe_variants import SHAPES, materialised_delta_bytes

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe")
    argv = ["--quick", "--device", "cpu", "--threads", "1", "--out", str(out), "--no-progress"]
    assert moe.main(argv) == 0
    (path,) = out.glob("*_cpu_moe.json")
    (table,) = out.glob("*_cpu_moe.md")
    return json.loads(path.read_text()), table.read_text()


@pytest.mark.slow  # ~8 s with the next: three tiny models, two rounds
def test_quick_run_writes_every_variant_with_paired_ratios(quick_run):
    result, table = quick_run
    rows = {row["implementation"]: row for row in result["rows"]}
    assert set(rows) == {"floor", "ours", "peft"}
    meta = result["metadata"]
    assert meta["experts"] == SHAPES["tiny"].experts and meta["threads"] == 1
    assert meta["rounds"] == 2 and meta["batch"] == 2 and meta["seq"] == 16
    for row in rows.values():
        assert row["rounds"] == 2
        assert 0 < row["min_s"] <= row["median_s"] <= row["max_s"]
        assert row["x_floor_min"] <= row["x_floor"] <= row["x_floor_max"]
        assert row["peak_bytes"] > 0 and row["saved_bytes"] > 0
    assert rows["floor"]["x_floor"] == 1.0 and rows["floor"]["trainable_parameters"] == 0
    assert rows["peft"]["x_peft"] == 1.0
    # peft's adapters save more for backward and peak higher than no adapters at all
    assert rows["peft"]["saved_beyond_floor"] > 0 and rows["peft"]["peak_beyond_floor"] > 0
    assert rows["ours"]["x_peft_min"] <= rows["ours"]["x_peft"] <= rows["ours"]["x_peft_max"]
    assert rows["ours"]["peak_beyond_floor_vs_peft"] > 0
    assert "check: loss lightning-peft" in table  # the same model on both sides
    assert "| floor (no adapters) |" in table and "| lightning-peft |" in table


@pytest.mark.slow
def test_adapters_cover_attention_and_every_expert(quick_run):
    """r × (in + out) per attention projection, r × E × (in + out) per fused expert
    parameter (peft's layout), in every layer."""
    result, _ = quick_run
    shape, r = SHAPES["tiny"], result["metadata"]["rank"]
    h, i, e = shape.hidden, shape.expert_intermediate, shape.experts
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    attention = r * ((h + q) + 2 * (h + kv) + (q + h))
    experts = r * e * ((h + 2 * i) + (i + h))
    expected = shape.layers * (attention + experts)
    for row in result["rows"]:
        if row["implementation"] != "floor":
            assert row["trainable_parameters"] == expected, row["implementation"]


def test_materialised_delta_counts_every_expert_weight():
    import torch

    from benchmarks.moe_variants import load_base_model

    shape = SHAPES["tiny"]
    model = load_base_model(shape, torch.float32, torch.device("cpu"), None)
    per_layer = shape.experts * 3 * shape.hidden * shape.expert_intermediate
    assert materialised_delta_bytes(model, torch.float32) == 4 * shape.layers * per_layer


GPU_CHECK = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def test_gpu_check_runs_the_moe_benchmark_with_options_that_parse():
    """gpu_check.sh is valid bash, and its MoE command's options parse here (the device aside:
    no CUDA on this machine) into the stated GPU shape: bf16, E=64, hidden 2048, top-8."""
    import torch

    subprocess.run(["bash", "-n", str(GPU_CHECK)], check=True)
    script = GPU_CHECK.read_text().replace("\\\n", " ")
    (command,) = re.findall(r"-m benchmarks moe (.*)", script)
    argv = [a for a in shlex.split(command.split(">")[0]) if a != "$OUT"]
    argv[argv.index("--device") + 1] = "cpu"
    argv.remove("--out")
    args = moe.parse_args(argv)
    assert (args.dtype, args.shape, args.rounds) == ("bfloat16", "gpu", 8)
    shape = SHAPES[args.shape]
    assert (shape.experts, shape.hidden, shape.top_k) == (64, 2048, 8)
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(shape.config())
    experts = model.model.layers[0].mlp.experts
    assert tuple(experts.gate_up_proj.shape) == (64, 2 * shape.expert_intermediate, 2048)
