"""Divergence is caught where it starts: PEFTCallback stops ``fit`` at the first NaN or infinity
in the loss or the trained gradients, naming the step, the first tensor and the last finite
checkpoint, and never writes a non-finite adapter; a step a gradient scaler skips is not an
error; ``check_finite=False`` is Lightning's behaviour; ``save_adapter`` refuses NaN by name."""

from __future__ import annotations

import copy
import hashlib
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from safetensors.torch import load_file

from lightning_peft import LoRAConfig, PEFTCallback, adapter_state_dict, inject_adapters
from lightning_peft.core.errors import DivergenceError, NonFiniteError
from lightning_peft.peft_format.files import WEIGHTS_NAME, save_adapter
from tests.helpers.lightning_modules import PlainCausalLM, quiet_trainer, tiny_llama64

LORA = LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])  # 8 trained tensors
FIRST = "model.model.layers.0.self_attn.q_proj.lora_A"


def files(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root``."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def all_finite(tensors) -> bool:
    return all(torch.isfinite(t).all() for t in tensors.values())


class NaNLoss(PlainCausalLM):
    """Makes the loss NaN at ``batch_idx == at``: ``loss + nan`` keeps the gradients finite,
    ``loss * nan`` makes them NaN too."""

    def __init__(self, at: int, gradients_too: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.at, self.gradients_too = at, gradients_too

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch, labels=batch).loss
        if batch_idx == self.at:
            nan = torch.tensor(math.nan)
            loss = loss * nan if self.gradients_too else loss + nan
        self.losses.append(loss.item())
        return loss


class AdaptersBeforeEachBatch(Callback):
    """The adapters at the start of each batch (``adapters``: the last batch's)."""

    def __init__(self):
        self.history = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.adapters = {k: v.clone() for k, v in adapter_state_dict(pl_module).items()}
        self.history.append(self.adapters)


def test_a_diverging_run_stops_at_the_first_nan_naming_step_tensor_and_checkpoint(tmp_path):
    """lr=1e12: the run of the issue. Nothing is written to save_adapter_to, nor to a fallback."""
    destination = tmp_path / "adapter"
    saver = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=1, save_top_k=-1)
    callback = PEFTCallback(copy.deepcopy(LORA), save_adapter_to=destination, verbose=False)
    seen = AdaptersBeforeEachBatch()
    module = PlainCausalLM(lr=1e12)
    run = quiet_trainer(tmp_path, [callback, seen, saver], max_steps=20)
    with pytest.raises(DivergenceError) as caught:
        run.fit(module)
    step = len(module.losses) - 1  # the step whose loss went NaN
    assert step >= 1 and math.isnan(module.losses[-1])
    assert all(math.isfinite(loss) for loss in module.losses[:-1])
    checkpoint = tmp_path / "checkpoints" / f"epoch=0-step={step}.ckpt"
    assert str(caught.value) == (
        f"PEFTCallback: training diverged at step {step} (epoch 0, batch {step}): the loss is nan "
        f"and the gradients of 8 of the 8 trained tensors are not finite, first {FIRST} (256 of "
        "256 values NaN or infinite). The adapters were not updated with this step; nothing was "
        f"written to {destination}; the last checkpoint with finite tensors is {checkpoint} "
        f"(step {step}). Lower the learning rate or clip the gradients (check_finite=False, or "
        "--check_finite false, turns this check off)"
    )
    assert run.global_step == step
    assert not destination.exists() and not (tmp_path / "peft_adapter_fallback").exists()
    now = adapter_state_dict(module)  # not updated with the NaN gradients
    assert all_finite(now)
    assert all(torch.equal(now[k], v) for k, v in seen.adapters.items())
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert all_finite(state) and all(torch.equal(state[k], now[k]) for k in now)


def test_without_a_checkpoint_the_error_says_so(tmp_path):
    module = NaNLoss(at=0, gradients_too=True)
    with pytest.raises(DivergenceError, match=r"step 0 .*; no checkpoint was written\. Lower"):
        quiet_trainer(tmp_path, [PEFTCallback(copy.deepcopy(LORA), verbose=False)], 4).fit(module)
    assert files(tmp_path) == {}


@pytest.mark.parametrize(("accumulate", "step"), [(1, 3), (2, 1)])
def test_a_nan_loss_with_finite_gradients_names_its_step(tmp_path, accumulate, step):
    """NaN added to the loss at batch 3 (its gradients stay finite): caught from the loss."""
    module, seen = NaNLoss(at=3), AdaptersBeforeEachBatch()
    callback = PEFTCallback(copy.deepcopy(LORA), verbose=False)
    run = quiet_trainer(tmp_path, [callback, seen], 10, accumulate_grad_batches=accumulate)
    with pytest.raises(DivergenceError) as caught:
        run.fit(module)
    assert str(caught.value).startswith(
        f"PEFTCallback: training diverged at step {step} (epoch 0, batch 3): the loss is nan and "
        "the trained tensors' gradients are finite. The adapters were not updated with this step;"
        " no checkpoint was written."
    )
    assert len(module.losses) == 4 and run.global_step == step
    now = adapter_state_dict(module)
    assert all(torch.equal(now[k], v) for k, v in seen.adapters.items())


class HugeLoss(PlainCausalLM):
    """A loss scaled by 1e30: finite, with finite gradients whose L2 norms overflow float32."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx) * 1e30
        assert math.isfinite(loss.item())
        return loss


class LargestGradient(Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.largest = max(g.abs().max().item() for g in grads)
        self.norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item()


def test_huge_finite_gradients_are_not_called_non_finite(tmp_path):
    """The fused check is an L2 norm, which overflows for these; each flagged tensor is confirmed
    exactly before anything is reported, so the run goes on and the adapter is written."""
    destination, largest = tmp_path / "adapter", LargestGradient()
    callback = PEFTCallback(copy.deepcopy(LORA), save_adapter_to=destination, verbose=False)
    quiet_trainer(tmp_path, [callback, largest], 2).fit(HugeLoss(lr=1e-3))
    assert largest.norm == math.inf and 1e20 < largest.largest < math.inf
    assert all_finite(load_file(destination / WEIGHTS_NAME))


def test_check_finite_false_is_lightning_s_behaviour(tmp_path):
    """No check: fit runs to its end and writes the NaN adapter it was asked to write (with a
    warning naming a non-finite tensor)."""
    destination = tmp_path / "adapter"
    callback = PEFTCallback(
        copy.deepcopy(LORA), save_adapter_to=destination, verbose=False, check_finite=False
    )
    module = PlainCausalLM(lr=1e12)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run = quiet_trainer(tmp_path, [callback], max_steps=6)
        run.fit(module)
    assert run.global_step == 6 and len(module.losses) == 6 and math.isnan(module.losses[-1])
    written = load_file(destination / WEIGHTS_NAME)
    assert len(written) == 8 and all(not torch.isfinite(t).all() for t in written.values())
    messages = [str(w.message) for w in record if "check_finite=False" in str(w.message)]
    assert len(messages) == 1
    assert re.match(
        r"PEFTCallback\(check_finite=False\): the values of 8 of the 8 trained tensors are not "
        rf"finite, first {FIRST} \(256 of 256 values NaN or infinite\); the adapter is written "
        r"as it is",
        messages[0],
    )


class PoisonAtTheEnd(Callback):
    """An update that overflowed in the last step: no later step can see it."""

    def on_train_end(self, trainer, pl_module):
        with torch.no_grad():
            pl_module.model.model.layers[1].self_attn.v_proj.lora_B[0, :3] = math.inf


def test_a_non_finite_adapter_at_the_end_is_written_nowhere(tmp_path):
    destination = tmp_path / "adapter"
    callback = PEFTCallback(copy.deepcopy(LORA), save_adapter_to=destination, verbose=False)
    with pytest.raises(DivergenceError) as caught:
        quiet_trainer(tmp_path, [PoisonAtTheEnd(), callback], 2).fit(PlainCausalLM())
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    assert str(caught.value) == (
        f"PEFTCallback: training ended with a non-finite adapter: {key} holds 3 NaN or infinite "
        f"values of 128. It was not written to {destination} (nor anywhere else); "
        "check_finite=False writes it anyway"
    )
    assert files(tmp_path) == {}  # no adapter, no fallback


def test_save_adapter_refuses_non_finite_tensors_by_name(tmp_path):
    model = tiny_llama64()
    inject_adapters(model, copy.deepcopy(LORA))
    directory = tmp_path / "adapter"
    save_adapter(model, directory)
    before = files(directory)
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.lora_A[1, :2] = math.nan
        model.model.layers[1].self_attn.q_proj.lora_B[0, 0] = -math.inf
    with pytest.raises(NonFiniteError) as caught:
        save_adapter(model, directory, overwrite=True)
    assert str(caught.value) == (
        f"refusing to write a non-finite adapter to {directory}: base_model.model.model.layers.0."
        "self_attn.v_proj.lora_A.weight holds 2 NaN or infinite values of 256 (and 1 more of the "
        "8 tensors); pass allow_non_finite=True to write it anyway"
    )
    assert isinstance(caught.value, ValueError)
    assert files(directory) == before  # untouched
    with pytest.raises(NonFiniteError):
        save_adapter(model, tmp_path / "new")
    assert not (tmp_path / "new").exists()  # not even created
    save_adapter(model, directory, overwrite=True, allow_non_finite=True)
    written = load_file(directory / WEIGHTS_NAME)
    assert written["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"][0, 0] == (
        -math.inf
    )


def fp16_scaler_plugin(init_scale: float) -> MixedPrecision:
    """Lightning's own '16-mixed' plugin on the CPU (the Trainer's precision='16-mixed' falls
    back to bf16 there, without a scaler): fp16 autocast and a real GradScaler."""
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, backoff_factor=2.0**-24)
    return MixedPrecision("16-mixed", "cpu", scaler)


class RecordScale(Callback):
    def __init__(self):
        self.scales = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.scales.append(trainer.precision_plugin.scaler.get_scale())


def test_a_step_the_grad_scaler_skips_is_not_an_error(tmp_path):
    """A scale of 2**40 overflows the fp16 gradients: the scaler skips the first step and backs
    off; the run goes on and writes a finite adapter."""
    destination, scales = tmp_path / "adapter", RecordScale()
    callback = PEFTCallback(copy.deepcopy(LORA), save_adapter_to=destination, verbose=False)
    module, seen = PlainCausalLM(), AdaptersBeforeEachBatch()
    run = quiet_trainer(
        tmp_path, [callback, seen, scales], 4, plugins=[fp16_scaler_plugin(2.0**40)]
    )
    run.fit(module)
    assert scales.scales[0] == 2.0**16  # the first step was skipped: 2**40 * 2**-24
    assert scales.scales[1:] == [2.0**16] * 3  # the others were not
    first, second, third = seen.history[:3]
    assert all(torch.equal(first[k], second[k]) for k in first)  # skipped: no update
    assert not all(torch.equal(second[k], third[k]) for k in first)  # stepped
    assert run.global_step == 4 and all(math.isfinite(loss) for loss in module.losses)
    assert all_finite(load_file(destination / WEIGHTS_NAME))


def test_under_a_grad_scaler_a_nan_loss_it_does_not_skip_is_still_an_error(tmp_path):
    module = NaNLoss(at=1)  # finite gradients: the scaler steps
    callback = PEFTCallback(copy.deepcopy(LORA), verbose=False)
    run = quiet_trainer(tmp_path, [callback], 4, plugins=[fp16_scaler_plugin(2.0**8)])
    with pytest.raises(DivergenceError, match=r"at step 1 \(epoch 0, batch 1\): the loss is nan"):
        run.fit(module)
