"""Two nodes simulated on one machine: two launches of ``tests/multinode_script.py`` with
``num_nodes=2``, ``NODE_RANK`` 0 and 1, ``MASTER_ADDR=127.0.0.1``, a free ``MASTER_PORT`` and
gloo, under Lightning's own multi-node launch. They train, checkpoint, resume and export the
adapter; peft loads the export with the trained model's logits."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.lightning_modules import tiny_llama64
from tests.lightning import multinode_script

SCRIPT = Path(multinode_script.__file__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_nodes(out: Path, phase: str) -> None:
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), str(out), phase],
            env={**env, "NODE_RANK": str(rank)},
            cwd=SCRIPT.parents[2],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    errors = []
    for rank, node in enumerate(nodes):
        try:
            _, stderr = node.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            node.kill()
            _, stderr = node.communicate()
        if node.returncode != 0:
            errors.append(f"node {rank} exited {node.returncode}:\n{stderr[-3000:]}")
    assert not errors, "\n".join(errors)


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two_nodes")
    launch_two_nodes(out, "train")
    launch_two_nodes(out, "resume")
    return out


def records(out: Path, phase: str) -> list[dict]:
    return [torch.load(out / f"{phase}_rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.slow
def test_two_nodes_train_as_one_data_parallel_job(two_node_run):
    ranks = records(two_node_run, "train")
    assert [(r["global_rank"], r["node_rank"], r["world_size"]) for r in ranks] == [
        (0, 0, 2),
        (1, 1, 2),
    ]
    first, second = ranks
    assert first["end_step"] == multinode_script.TRAIN_STEPS
    for key, value in first["end"].items():
        torch.testing.assert_close(second["end"][key], value, rtol=0, atol=0)  # all-reduced
        if key.endswith("lora_B"):
            assert value.abs().sum() > 0 and not second["start"][key].any()  # trained from 0


@pytest.mark.slow
def test_two_nodes_resume_from_the_checkpoint(two_node_run):
    trained = records(two_node_run, "train")[0]["end"]
    for resumed in records(two_node_run, "resume"):
        assert resumed["start_step"] == multinode_script.TRAIN_STEPS
        assert resumed["end_step"] == multinode_script.RESUME_STEPS
        for key, value in trained.items():
            torch.testing.assert_close(resumed["start"][key], value, rtol=0, atol=0)
    first, second = records(two_node_run, "resume")
    for key, value in first["end"].items():
        torch.testing.assert_close(second["end"][key], value, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["train", "resume"])
def test_the_exported_adapter_loads_in_peft_with_the_trained_logits(two_node_run, phase):
    peft = pytest.importorskip("peft")
    adapter = two_node_run / f"adapter_{phase}"
    base = tiny_llama64(0).eval()  # CausalLM's model: the same seed, the same weights
    model = peft.PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        logits = model(input_ids=multinode_script.IDS).logits
    expected = records(two_node_run, phase)[0]["logits"]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
