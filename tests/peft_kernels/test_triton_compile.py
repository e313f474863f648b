"""The Triton kernels compile for Hopper and Ampere GPUs (ahead of time: no GPU needed).

``tests/triton_aot.py`` runs in a subprocess because this process runs triton in interpreter
mode (``tests/conftest.py``), where kernels cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).with_name("triton_aot.py")
GEMM_KERNELS = {"_fused_linear_fwd_kernel", "_lora_grad_x_kernel"}
# Shared memory a block may use: sm_80 (A100) 163 KiB, sm_90 (H100/H200) 227 KiB.
MAX_SHARED = {80: 163 * 1024, 90: 227 * 1024}
BYTES = {"bf16": 2, "fp16": 2}


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    try:
        run = subprocess.run(
            [sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600
        )
    except subprocess.TimeoutExpired:
        pytest.fail("ahead-of-time compilation took over 10 minutes")
    if run.returncode != 0 and "ptxas" in run.stderr and "not found" in run.stderr:
        pytest.skip("this triton build ships no ptxas")
    assert run.returncode == 0, run.stderr[-4000:]
    return [json.loads(line) for line in run.stdout.splitlines()]


def test_every_kernel_compiles_for_both_architectures(compiled):
    kernels = {r["kernel"] for r in compiled}
    assert kernels == {
        "_lora_down_kernel",
        "_fused_linear_fwd_kernel",
        "_lora_bwd_dy_kernel",
        "_lora_grad_x_kernel",
        "_lora_grad_a_kernel",
    }
    for capability in (80, 90):
        assert {r["kernel"] for r in compiled if r["capability"] == capability} == kernels
    for record in compiled:
        assert record["cubin_bytes"] > 0
        assert record["shared_bytes"] <= MAX_SHARED[record["capability"]], record


def test_gemm_kernels_use_tensor_cores_with_pipelined_loads(compiled):
    """wgmma on Hopper, mma.sync on Ampere; the K loop keeps ≥ 2 tiles in flight (cp.async)."""
    for record in compiled:
        assert record["cp_async"], record
        if record["kernel"] not in GEMM_KERNELS:
            continue
        assert record["wgmma" if record["capability"] == 90 else "mma_sync"], record
        config = record["config"]
        stage_bytes = (
            (config["BLOCK_M"] + config["BLOCK_N"]) * config["BLOCK_K"] * BYTES[record["dtype"]]
        )
        if not record["flags"].get("DORA"):  # the plain LoRA kernel: a textbook GEMM loop
            assert record["shared_bytes"] >= 2 * stage_bytes, record
