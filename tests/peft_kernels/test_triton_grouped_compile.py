"""The grouped (SGMV) Triton kernels compile for Hopper and Ampere (ahead of time, no GPU).

``triton_grouped_aot.py`` runs in a subprocess: this process runs triton in interpreter mode.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

pytestmark = pytest.mark.slow  # ~1 min: 24 kernel variants through ptxas

SCRIPT = Path(__file__).with_name("triton_grouped_aot.py")
MAX_SHARED = {80: 163 * 1024, 90: 227 * 1024}  # bytes a block may use: A100, H100/H200


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--first"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if run.returncode != 0 and "ptxas" in run.stderr and "not found" in run.stderr:
        pytest.skip("this triton build ships no ptxas")
    assert run.returncode == 0, run.stderr[-4000:]
    return [json.loads(line) for line in run.stdout.splitlines()]


def test_every_grouped_kernel_compiles(compiled):
    kernels = {"_shrink_kernel", "_expand_kernel", "_outer_kernel"}
    for capability in (80, 90):
        assert {r["kernel"] for r in compiled if r["capability"] == capability} == kernels
    assert len(compiled) == 24
    for record in compiled:
        assert record["cubin_bytes"] > 0
        assert record["shared_bytes"] <= MAX_SHARED[record["capability"]], record


def test_tensor_cores_and_atomics_where_expected(compiled):
    """16-bit tiles use wgmma (Hopper; the per-group walk of the outer kernel mma.sync) or
    mma.sync (Ampere); only the dx scatter (MODE 1) has atomics."""
    for record in compiled:
        assert record["atomics"] == (record["flags"].get("MODE") == 1), record
        if record["dtypes"][1] == "fp32":
            continue
        if record["capability"] == 90 and record["kernel"] != "_outer_kernel":
            assert record["wgmma"], record
        else:
            assert record["wgmma"] or record["mma_sync"], record
