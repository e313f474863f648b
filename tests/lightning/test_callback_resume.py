"""Exact resume: a run resumed from an end-of-epoch checkpoint equals the uninterrupted run bit
for bit, with dropout and shuffling, for LoRA, DoRA and bottleneck adapters. The callback keeps
the random states (torch, numpy, Python, the DataLoader's generator) in the checkpoint; without
them the resumed run draws other dropout masks and another order."""

from __future__ import annotations

import copy
import random

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

import lightning_peft.lightning.random_state as random_state
from lightning_peft import AdapterConfig, LoRAConfig, PEFTCallback, adapter_state_dict
from tests.helpers.lightning_modules import PlainCausalLM, quiet_trainer

WITH_DROPOUT = {
    "lora": LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.2),
    "dora": LoRAConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.2, use_dora=True
    ),
    "adapter": AdapterConfig(bottleneck_dim=8, target_modules=["mlp"], dropout=0.2),
}
EPOCHS = 2  # 8 steps an epoch


def _trainer(root, config, max_epochs, extra=()):
    callback = PEFTCallback(copy.deepcopy(config), verbose=False)
    return quiet_trainer(root, [callback, *extra], max_epochs=max_epochs)


def _uninterrupted_and_resumed(tmp_path, config, shuffle):
    """(uninterrupted module, resumed module): the second trained one epoch, checkpointed,
    and resumed in a "new process" (other global random states) for the second epoch."""
    pl.seed_everything(0, verbose=False)
    whole = PlainCausalLM(shuffle=shuffle)
    _trainer(tmp_path / "whole", config, EPOCHS).fit(whole)

    pl.seed_everything(0, verbose=False)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="epoch")
    _trainer(tmp_path / "first", config, 1, [saver]).fit(PlainCausalLM(shuffle=shuffle))

    torch.manual_seed(1234), random.seed(1234), np.random.seed(1234)  # a new process
    resumed = PlainCausalLM(shuffle=shuffle)
    _trainer(tmp_path / "resumed", config, EPOCHS).fit(resumed, ckpt_path=saver.best_model_path)
    return whole, resumed


def _assert_same_training(whole, resumed):
    assert resumed.losses == whole.losses[8:]  # the second epoch's losses, exactly
    expected, actual = adapter_state_dict(whole), adapter_state_dict(resumed)
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


@pytest.mark.parametrize(
    ("method", "shuffle"),
    [
        ("lora", "default"),
        pytest.param("dora", "default", marks=pytest.mark.slow),
        pytest.param("adapter", "default", marks=pytest.mark.slow),
        ("lora", "generator"),
    ],
)
def test_resume_at_an_epoch_boundary_is_exact_with_dropout_and_shuffling(tmp_path, method, shuffle):
    whole, resumed = _uninterrupted_and_resumed(tmp_path, WITH_DROPOUT[method], shuffle)
    _assert_same_training(whole, resumed)


@pytest.mark.parametrize("shuffle", ["default", "generator"])
def test_without_the_random_states_the_resumed_run_differs(tmp_path, monkeypatch, shuffle):
    """The test above can fail: skip the restore and the second epoch differs."""
    monkeypatch.setattr(random_state, "restore", lambda state: [])
    monkeypatch.setattr(random_state, "restore_loaders", lambda state, loaders: [])
    config = LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])  # no dropout
    whole, resumed = _uninterrupted_and_resumed(tmp_path, config, shuffle)
    assert resumed.losses != whole.losses[8:]


def test_random_states_survive_a_weights_only_load(tmp_path):
    """What the checkpoint holds of them loads with torch.load(weights_only=True), Lightning's
    default, and restores exactly."""
    generator = torch.Generator().manual_seed(5)
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    loader = DataLoader(range(10), shuffle=True, generator=generator)
    torch.save(random_state.capture(random_state.loader_generators(loader)), tmp_path / "s.pt")
    expected = torch.rand(3), random.random(), np.random.rand(), list(loader)
    torch.manual_seed(0), random.seed(0), np.random.seed(0), generator.manual_seed(0)
    states = torch.load(tmp_path / "s.pt", weights_only=True)
    assert random_state.restore(states) == []
    actual = torch.rand(3), random.random(), np.random.rand()
    assert torch.equal(actual[0], expected[0]) and actual[1:] == expected[1:3]
    iterator = iter(loader)  # as Lightning does before on_train_start, then the restore
    assert random_state.restore_loaders(states, loader) == []
    assert [batch.tolist() for batch in iterator] == [batch.tolist() for batch in expected[3]]


def test_resuming_an_epoch_end_with_max_steps_warns(tmp_path):
    """Lightning resumes such a checkpoint inside the finished epoch (one extra batch)."""
    config = LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="epoch")
    _trainer(tmp_path / "first", config, 1, [saver]).fit(PlainCausalLM())
    callback = PEFTCallback(copy.deepcopy(config), verbose=False)
    with pytest.warns(UserWarning, match="this checkpoint ends an epoch and max_steps is set"):
        quiet_trainer(tmp_path / "resumed", [callback], max_steps=10).fit(
            PlainCausalLM(), ckpt_path=saver.best_model_path
        )


def test_random_states_of_another_number_of_processes_are_not_restored(tmp_path, monkeypatch):
    config = LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="epoch")
    _trainer(tmp_path / "first", config, 1, [saver]).fit(PlainCausalLM())
    checkpoint = torch.load(saver.best_model_path, weights_only=True)
    states = checkpoint["callbacks"]["PEFTCallback"]["random_states"]
    checkpoint["callbacks"]["PEFTCallback"]["random_states"] = states * 2  # as if from 2 ranks
    torch.save(checkpoint, tmp_path / "two_ranks.ckpt")
    restored = []
    monkeypatch.setattr(random_state, "restore", lambda state: restored.append(state) or [])
    with pytest.warns(UserWarning, match="random states of 2 processes, this run has 1"):
        _trainer(tmp_path / "resumed", config, 2).fit(
            PlainCausalLM(), ckpt_path=tmp_path / "two_ranks.ckpt"
        )
    assert restored == []
    _trainer(tmp_path / "resumed", config, 2).fit(PlainCausalLM(), ckpt_path=saver.best_model_path)
    assert len(restored) == 1  # the control: one process's states are restored
