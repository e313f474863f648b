"""PEFTCallback on two CPU processes (gloo): DDP, ddp_spawn, FSDP2, FSDP1; DeepSpeed on a GPU.

Each strategy trains once, checkpoints, writes the PEFT adapter and resumes (see
``distributed_script.py``); the tests below assert on the files its ranks wrote. ``ddp`` and the
FSDP strategies re-launch their command for rank 1, so they run the script as a subprocess;
``ddp_spawn`` runs in this process, and its workers' modules never come back here.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from tests.helpers.lightning_modules import CausalLM, tiny_llama64
from tests.lightning import distributed_script
from tests.lightning.distributed_script import FIRST_STEPS, IDS, run

SCRIPT = Path(distributed_script.__file__)
# ddp_spawn starts four interpreters (two workers a fit): over 30 s on 2 cores.
STRATEGIES = [
    "ddp",
    pytest.param("ddp_spawn", marks=pytest.mark.slow),
    "fsdp2",
    "fsdp2_full",
    "fsdp",
]
# Strategies launched together in one script run (one interpreter start-up for both).
SCRIPT_RUNS = {"ddp": ("ddp",), "fsdp2": ("fsdp2", "fsdp2_full"), "fsdp": ("fsdp",)}
SCRIPT_RUNS["fsdp2_full"] = SCRIPT_RUNS["fsdp2"]


def _run_script(out: Path, names: tuple[str, ...]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("LOCAL_RANK", None)  # a launched rank 0 must launch its own rank 1
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), *names],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=SCRIPT.parents[2],
    )
    if result.returncode != 0:
        raise RuntimeError(f"{SCRIPT.name} {' '.join(names)} failed:\n{result.stderr[-4000:]}")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Callable[[str], Path]:
    """``outputs(strategy)``: the directory its ranks wrote, running it on first use only."""
    done: dict[str, Path | Exception] = {}

    def get(name: str) -> Path:
        if name not in done:
            root = tmp_path_factory.mktemp(name)
            try:
                if name == "ddp_spawn":
                    run(name, root / name)
                else:
                    _run_script(root, SCRIPT_RUNS[name])
                done.update({n: root / n for n in SCRIPT_RUNS.get(name, (name,))})
            except Exception as error:
                done[name] = error
        if isinstance(done[name], Exception):
            pytest.fail(f"the {name} run failed: {done[name]}")
        return done[name]

    return get


def _records(out: Path, tag: str) -> list[dict[str, Any]]:
    return [torch.load(out / f"{tag}_rank{rank}.pt", weights_only=False) for rank in (0, 1)]


def _assert_equal(actual: dict, expected: dict, what: str, empty_ok: bool = False) -> None:
    assert actual.keys() == expected.keys() and (expected or empty_ok), what
    for key, value in expected.items():
        assert torch.equal(actual[key], value), f"{what}: {key}"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_trains_adapters_only(outputs, strategy):
    """Loss finite, adapters moved, frozen weights bit-identical to the base on every rank."""
    base = CausalLM().state_dict()
    for record in _records(outputs(strategy), "first"):
        start, end = record["start"], record["end"]
        assert end["step"] == FIRST_STEPS
        assert len(record["losses"]) == FIRST_STEPS
        assert all(torch.isfinite(torch.tensor(record["losses"])))
        assert any(not torch.equal(end["adapters"][k], v) for k, v in start["adapters"].items())
        assert start["frozen"].keys() == base.keys()  # every base tensor, none trained
        _assert_equal(end["frozen"], {k: base[k] for k in start["frozen"]}, "frozen weights")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_adapters_equal_across_ranks(outputs, strategy):
    first = _records(outputs(strategy), "first")
    _assert_equal(first[1]["end"]["adapters"], first[0]["end"]["adapters"], "rank 1 vs rank 0")
    torch.testing.assert_close(first[1]["logits"], first[0]["logits"], rtol=0, atol=0)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_checkpoint_holds_adapters_only(outputs, strategy, tmp_path):
    """A single-file checkpoint holds only the adapters; FSDP2's sharded one keeps the frozen
    keys too (it is loaded in place, and sharded loading ignores ``strict_loading``)."""
    out = outputs(strategy)
    path = distributed_script.checkpoint_path(out)
    adapters = _records(out, "first")[0]["end"]["adapters"]
    if strategy == "fsdp2":
        from torch.distributed.checkpoint import FileSystemReader

        keys = set(FileSystemReader(path).read_metadata().state_dict_metadata)
        assert {f"state_dict.{k}" for k in CausalLM().state_dict()} <= keys
        return
    saved = torch.load(path, weights_only=False)
    assert set(saved["state_dict"]) == set(adapters)
    full, states = tmp_path / "full.pt", tmp_path / "random_states.pt"
    torch.save(CausalLM().state_dict(), full)
    torch.save(saved["callbacks"]["PEFTCallback"]["random_states"], states)  # ~12 KB a rank
    assert (path.stat().st_size - states.stat().st_size) / full.stat().st_size < 0.15


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resume_restores_adapters_and_optimizer_exactly(outputs, strategy):
    """At ``on_train_start`` of the resumed run, each rank holds the adapters and its optimizer
    state as they were at the end of the first run (FSDP1 keeps no optimizer state for a
    parameter with an empty shard: there, a rank may hold none at all)."""
    out = outputs(strategy)
    first, resumed = _records(out, "first"), _records(out, "resumed")
    for before, after in zip(first, resumed, strict=True):
        assert after["start"]["step"] == FIRST_STEPS
        _assert_equal(after["start"]["adapters"], before["end"]["adapters"], "adapters")
        saved, restored = before["end"]["optimizer"]["state"], after["start"]["optimizer"]["state"]
        assert saved.keys() == restored.keys()
        for index, state in saved.items():
            _assert_equal(restored[index], state, f"optimizer state {index}", empty_ok=True)
    assert any(record["end"]["optimizer"]["state"] for record in first)


def _peft_check(out: Path, record: dict[str, Any], rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """``out/adapter`` holds the trained adapter, and ``peft`` loads it onto a fresh base with
    the trained model's logits."""
    peft = pytest.importorskip("peft")
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    expected = {
        f"base_model.model.{key.removeprefix('model.')}.weight": value
        for key, value in record["end"]["adapters"].items()
    }
    _assert_equal(saved, expected, "saved adapter vs the trained one")
    theirs = peft.PeftModel.from_pretrained(tiny_llama64().eval(), out / "adapter")
    with torch.no_grad():
        logits = theirs(input_ids=IDS).logits
    torch.testing.assert_close(logits, record["logits"], rtol=rtol, atol=atol)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_save_adapter_to_loads_in_peft_with_the_same_outputs(outputs, strategy):
    out = outputs(strategy)
    tag = "save" if strategy == "fsdp" else "first"  # FSDP1 saves in a run of its own
    error = out / "save_error_rank0.txt"
    assert not error.exists(), error.read_text()
    _peft_check(out, _records(out, tag)[0])


# -- DeepSpeed: no CPU support in Lightning, so on a GPU only ---------------------------------


class _AdaptersOnTrainStart(Callback):
    def on_train_start(self, trainer, pl_module):
        from lightning_peft import adapter_state_dict

        adapters = adapter_state_dict(pl_module).items()
        self.adapters = {k: v.detach().cpu().clone() for k, v in adapters}
        self.step = trainer.global_step


@pytest.mark.cuda
def test_deepspeed_zero2(tmp_path):
    """ZeRO-2 on one GPU: trains, checkpoints without frozen weights, resumes, saves for peft."""
    pytest.importorskip("deepspeed")
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from lightning_peft import PEFTCallback, adapter_state_dict

    def trainer(callbacks, max_steps):
        return pl.Trainer(
            max_steps=max_steps,
            accelerator="cuda",
            devices=1,
            strategy=DeepSpeedStrategy(stage=2, exclude_frozen_parameters=True),
            default_root_dir=tmp_path,
            enable_progress_bar=False,
            enable_model_summary=False,
            logger=False,
            callbacks=callbacks,
        )

    module, base = CausalLM(), CausalLM().state_dict()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="first", every_n_train_steps=3)
    config = copy.deepcopy(distributed_script.CONFIG)
    callback = PEFTCallback(config, save_adapter_to=tmp_path / "adapter", verbose=False)
    trainer([callback, checkpoint], 3).fit(module)
    adapters = {k: v.detach().cpu() for k, v in adapter_state_dict(module).items()}
    for key, value in module.state_dict().items():
        if key not in adapters:
            assert torch.equal(value.cpu(), base[key]), key
    module.eval()
    with torch.no_grad():
        logits = module.model(input_ids=IDS.to(module.device)).logits.cpu()
    # GPU vs CPU logits: a looser tolerance.
    _peft_check(tmp_path, {"end": {"adapters": adapters}, "logits": logits}, rtol=1e-3, atol=1e-4)

    resumed = _AdaptersOnTrainStart()
    path = distributed_script.checkpoint_path(tmp_path)
    trainer([PEFTCallback(copy.deepcopy(config), verbose=False), resumed], 4).fit(
        CausalLM(), ckpt_path=path
    )
    assert resumed.step == 3
    _assert_equal(resumed.adapters, adapters, "adapters restored by DeepSpeed")
    (states,) = path.rglob("mp_rank_00_model_states.pt")  # exclude_frozen_parameters=True
    saved = torch.load(states, weights_only=False, map_location="cpu")["module"]
    assert len(saved) == len(adapters) and all(k.endswith(("lora_A", "lora_B")) for k in saved)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resume_restores_each_ranks_random_state(outputs, strategy):
    """Each rank's torch random state when the first run checkpointed (the ranks seeded theirs
    differently) is its state again once the resumed run has loaded the checkpoint."""
    out = outputs(strategy)
    first, resumed = _records(out, "first"), _records(out, "resumed")
    assert not torch.equal(first[0]["rng"], first[1]["rng"])
    for before, after in zip(first, resumed, strict=True):
        assert torch.equal(after["rng"], before["rng"])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_adapters_that_act_raise_no_gradient_warning(outputs, strategy):
    for record in _records(outputs(strategy), "first"):
        assert not [w for w in record["warnings"] if "no gradient" in w]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resume_with_another_config_is_refused_on_every_rank(outputs, strategy):
    out = outputs(strategy)
    ranks = (0,) if strategy == "ddp_spawn" else (0, 1)  # ddp_spawn: the parent's error
    expected = "target_modules: ['q_proj', 'v_proj'] in the checkpoint, ['k_proj'] in this run"
    for rank in ranks:
        message = (out / f"mismatch_rank{rank}.txt").read_text()
        assert "InputError" in message and expected in message, message
