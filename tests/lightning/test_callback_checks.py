"""PEFTCallback refuses what it cannot do, before any step, and leaves the model and the files
on disk as they were: targets that match nothing, a checkpoint of another configuration or model,
a missing or broken checkpoint, an adapter destination that cannot be written, adapters that
never act. And what fails at the very end (writing the adapter) never loses the adapter."""

from __future__ import annotations

import copy
import hashlib
import warnings
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import lightning.pytorch.trainer.call as lightning_call
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

import lightning_peft.lightning.callback as callback_module
from lightning_peft import (
    AdapterConfig,
    LoRAConfig,
    PEFTCallback,
    adapter_state_dict,
    inject_adapters,
    load_adapter,
)
from lightning_peft.core.errors import InputError
from lightning_peft.model.injection import find_injection
from tests.helpers.lightning_modules import (
    CausalLM,
    PlainCausalLM,
    SetupCausalLM,
    quiet_trainer,
    random_tokens,
    tiny_llama64,
)

LORA = LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
BUILT_IN = {
    "init": PlainCausalLM,
    "setup": SetupCausalLM,
    "configure_model": partial(CausalLM, build_in_configure_model=True),
}


def snapshot(module: nn.Module) -> dict:
    """Everything about a module that a failed fit must leave as it was."""
    return {
        "tensors": {k: v.clone() for k, v in module.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in module.named_parameters()},
        "modules": [(n, type(m).__name__) for n, m in module.named_modules() if n],
    }


def assert_unchanged(module: nn.Module, before: dict) -> None:
    after = snapshot(module)
    assert after["modules"] == before["modules"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, value in before["tensors"].items():
        assert torch.equal(after["tensors"][key], value), key
    assert find_injection(module) is None


def files(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root``."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint after 4 steps of LoRA (r=4, alpha=8) on q_proj of the 2-layer tiny Llama."""
    root = tmp_path_factory.mktemp("first_run")
    saver = ModelCheckpoint(dirpath=root, filename="first", every_n_train_steps=4)
    quiet_trainer(root, [PEFTCallback(copy.deepcopy(LORA), verbose=False), saver], 4).fit(
        PlainCausalLM()
    )
    return Path(saver.best_model_path)


# -- 1. targets that match nothing; where the model is built ----------------------------------


@pytest.mark.parametrize("built_in", list(BUILT_IN))
def test_targets_that_match_nothing_raise_before_any_step(tmp_path, built_in):
    module = BUILT_IN[built_in]()
    callback = PEFTCallback(LoRAConfig(r=4, target_modules=["q_porj"]), verbose=False)
    run = quiet_trainer(tmp_path, [callback], max_steps=2)
    with pytest.raises(InputError, match=r"q_porj.*q_proj"):  # the targets and a close match
        run.fit(module)
    assert run.global_step == 0 and module.losses == [] and callback.report is None
    reference = PlainCausalLM()  # what the module holds (or builds) untouched
    assert_unchanged(module, snapshot(reference))
    assert "configure_model" not in vars(module)  # the callback's step is gone


@pytest.mark.parametrize("built_in", list(BUILT_IN))
def test_injects_wherever_the_model_is_built(tmp_path, built_in):
    module = BUILT_IN[built_in]()
    callback = PEFTCallback(LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]), verbose=False)
    quiet_trainer(tmp_path, [callback], max_steps=2).fit(module)
    assert len(module.losses) == 2 and len(callback.report.modules) == 4
    adapters = adapter_state_dict(module)
    assert {n for n, p in module.named_parameters() if p.requires_grad} == set(adapters)
    base = tiny_llama64().state_dict()
    for key, value in module.model.state_dict().items():
        if key in base:
            assert torch.equal(value, base[key]), key  # the base model did not train
    assert "configure_model" not in vars(module)


def test_no_adapters_at_fit_start_raise_even_if_lightning_skips_configure_model(
    tmp_path, monkeypatch
):
    """Injection after ``LightningModule.setup`` relies on Lightning calling configure_model;
    if it did not, training must still not start without adapters."""
    monkeypatch.setattr(lightning_call, "_call_configure_model", lambda trainer: None)
    module = SetupCausalLM()
    run = quiet_trainer(tmp_path, [PEFTCallback(copy.deepcopy(LORA), verbose=False)], 2)
    with pytest.raises(InputError, match="no adapters when training starts"):
        run.fit(module)
    assert run.global_step == 0 and module.losses == []
    assert_unchanged(module, snapshot(PlainCausalLM()))


class StaleOptimizer(PlainCausalLM):
    """Takes the parameter list in ``__init__``, before the adapters exist."""

    def __init__(self):
        super().__init__()
        self.params = list(self.model.parameters())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.params, lr=self.lr)


def test_an_optimizer_without_the_adapters_is_refused(tmp_path):
    module = StaleOptimizer()
    run = quiet_trainer(tmp_path, [PEFTCallback(copy.deepcopy(LORA), verbose=False)], 2)
    with pytest.raises(InputError, match=r"nothing would train: the optimizers hold 0 of the 4"):
        run.fit(module)
    assert run.global_step == 0 and module.losses == []


def test_a_model_with_adapters_of_another_config_is_refused(tmp_path):
    module = PlainCausalLM()
    inject_adapters(module.model, LoRAConfig(r=4, target_modules=["k_proj"]))
    before = snapshot(module)
    run = quiet_trainer(tmp_path, [PEFTCallback(copy.deepcopy(LORA), verbose=False)], 2)
    with pytest.raises(
        InputError, match=r"already has adapters.*\['k_proj'\] in the model, \['q_proj'\]"
    ):
        run.fit(module)
    assert module.losses == []
    after = snapshot(module)
    assert after["requires_grad"] == before["requires_grad"]
    assert all(torch.equal(after["tensors"][k], v) for k, v in before["tensors"].items())


# -- 2. resuming with another adapter configuration or model ----------------------------------

MISMATCHES = {
    "targets": (
        LoRAConfig(r=4, lora_alpha=8, target_modules=["k_proj"]),
        r"target_modules: \['q_proj'\] in the checkpoint, \['k_proj'\] in this run",
    ),
    "rank": (
        LoRAConfig(r=8, lora_alpha=8, target_modules=["q_proj"]),
        r"r: 4 in the checkpoint, 8 in this run",
    ),
    "dora": (
        LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True),
        r"use_dora: False in the checkpoint, True in this run",
    ),
    "method": (
        AdapterConfig(bottleneck_dim=4, target_modules=["mlp"]),
        r"method: 'lora' in the checkpoint, 'adapter' in this run",
    ),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_resume_with_another_config_is_refused_before_the_model_is_touched(
    tmp_path, checkpoint, case
):
    config, message = MISMATCHES[case]
    module, on_disk = PlainCausalLM(), files(checkpoint.parent)
    before = snapshot(module)
    run = quiet_trainer(tmp_path, [PEFTCallback(copy.deepcopy(config), verbose=False)], 8)
    expected = rf"{checkpoint} was trained with another adapter configuration: .*{message}"
    with pytest.raises(InputError, match=expected):
        run.fit(module, ckpt_path=checkpoint)
    assert run.global_step == 0 and module.losses == []
    assert_unchanged(module, before)
    assert files(checkpoint.parent) == on_disk


@pytest.mark.parametrize(
    ("num_layers", "message"),
    [
        (3, r"lacks 2 of the 6 tensors this run trains \(model\.model\.layers\.2\.self_attn"),
        (1, r"holds 2 tensors this model does not have \(model\.model\.layers\.1\.self_attn"),
    ],
)
def test_resume_onto_another_model_is_refused_before_any_step(
    tmp_path, checkpoint, num_layers, message
):
    module = PlainCausalLM(num_layers=num_layers)
    run = quiet_trainer(tmp_path, [PEFTCallback(copy.deepcopy(LORA), verbose=False)], 8)
    with pytest.raises(InputError, match=message):
        run.fit(module, ckpt_path=checkpoint)
    assert run.global_step == 0 and module.losses == []
    lora_B = [v for k, v in adapter_state_dict(module).items() if k.endswith("lora_B")]
    assert lora_B and all(not v.any() for v in lora_B)  # nothing was loaded


def test_the_checks_also_run_when_lightning_loads_the_checkpoint(tmp_path, checkpoint, monkeypatch):
    """Without the early look at ckpt_path, on_load_checkpoint refuses it (before any step)."""
    monkeypatch.setattr(callback_module, "requested_ckpt_path", lambda trainer: None)
    module = PlainCausalLM()
    config = LoRAConfig(r=4, lora_alpha=16, target_modules=["q_proj"])
    run = quiet_trainer(tmp_path, [PEFTCallback(config, verbose=False)], 8)
    with pytest.raises(InputError, match=r"lora_alpha: 8 in the checkpoint, 16 in this run"):
        run.fit(module, ckpt_path=checkpoint)
    assert module.losses == []

    other = PlainCausalLM(num_layers=3)
    run = quiet_trainer(tmp_path, [PEFTCallback(copy.deepcopy(LORA), verbose=False)], 8)
    with pytest.raises(InputError, match=r"lacks 2 of the 6 tensors"):
        run.fit(other, ckpt_path=checkpoint)
    assert other.losses == []


def test_a_checkpoint_without_the_callback_state_is_refused(tmp_path, checkpoint):
    saved = torch.load(checkpoint, weights_only=False)
    del saved["callbacks"]["PEFTCallback"]
    path = tmp_path / "foreign.ckpt"
    torch.save(saved, path)
    module = PlainCausalLM()
    before = snapshot(module)
    run = quiet_trainer(tmp_path, [PEFTCallback(copy.deepcopy(LORA), verbose=False)], 8)
    with pytest.raises(InputError, match="records no PEFTCallback state"):
        run.fit(module, ckpt_path=path)
    assert_unchanged(module, before)


class Validated(PlainCausalLM):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(input_ids=batch, labels=batch).loss)

    def val_dataloader(self):
        return DataLoader(random_tokens(16, seed=2), batch_size=8)


def test_validating_from_a_weights_only_checkpoint_loads_the_adapters(tmp_path):
    """Without callback state a checkpoint cannot resume training, but can be validated."""
    trained = PlainCausalLM()
    saver = ModelCheckpoint(dirpath=tmp_path, filename="weights", save_weights_only=True)
    run = quiet_trainer(tmp_path, [PEFTCallback(copy.deepcopy(LORA), verbose=False), saver], 2)
    run.fit(trained)
    module = Validated()
    callback = PEFTCallback(copy.deepcopy(LORA), verbose=False)
    quiet_trainer(tmp_path, [callback], 2).validate(module, ckpt_path=saver.best_model_path)
    expected, actual = adapter_state_dict(trained), adapter_state_dict(module)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(actual[k], v) for k, v in expected.items())
    with pytest.raises(InputError, match="records no PEFTCallback state"):
        quiet_trainer(tmp_path, [callback], 4).fit(module, ckpt_path=saver.best_model_path)


# -- 3. a broken ckpt_path or save_adapter_to: refused before training -------------------------


def _broken_checkpoints(tmp_path: Path, checkpoint: Path) -> dict[str, tuple[Path, str]]:
    data = checkpoint.read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "a_directory").mkdir()
    archive = "is not a PyTorch checkpoint archive: a truncated or partially written file"
    return {
        "missing": (tmp_path / "missing.ckpt", "does not exist"),
        "truncated": (tmp_path / "truncated.ckpt", archive),
        "text": (tmp_path / "notes.txt", archive),
        "empty": (tmp_path / "empty.ckpt", archive),
        "directory": (tmp_path / "a_directory", "is a directory but not a sharded checkpoint"),
    }


@pytest.mark.parametrize("case", ["missing", "truncated", "text", "empty", "directory"])
def test_a_missing_or_broken_ckpt_path_is_refused_before_the_model_is_touched(
    tmp_path, checkpoint, case
):
    path, message = _broken_checkpoints(tmp_path, checkpoint)[case]
    on_disk = files(tmp_path)
    module = PlainCausalLM()
    before = snapshot(module)
    run = quiet_trainer(tmp_path / "run", [PEFTCallback(copy.deepcopy(LORA), verbose=False)], 8)
    with pytest.raises(InputError, match=rf"ckpt_path {path} {message}"):
        run.fit(module, ckpt_path=path)
    assert run.global_step == 0
    assert_unchanged(module, before)
    assert files(tmp_path) == on_disk


def test_a_config_that_does_not_fit_the_model_is_refused_before_it_is_touched(tmp_path):
    module = PlainCausalLM()
    before = snapshot(module)
    config = LoRAConfig(r=65, target_modules=["q_proj"], init_lora_weights="pissa")
    run = quiet_trainer(tmp_path, [PEFTCallback(config, verbose=False)], 2)
    with pytest.raises(InputError, match=r"pissa needs r <= min\(out, in\) = 64 .* got 65"):
        run.fit(module)
    assert run.global_step == 0
    assert_unchanged(module, before)


def test_an_unwritable_save_adapter_to_is_refused_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me\n")
    cases = {
        blocker / "adapter": rf"cannot create {blocker / 'adapter'}: {blocker} is a file",
        blocker: f"{blocker} is a file, not an adapter directory",
    }
    for destination, message in cases.items():
        module = PlainCausalLM()
        before, on_disk = snapshot(module), files(tmp_path)
        callback = PEFTCallback(copy.deepcopy(LORA), save_adapter_to=destination, verbose=False)
        run = quiet_trainer(tmp_path, [callback], max_steps=2)
        with pytest.raises(InputError, match=rf"save_adapter_to: {message}"):
            run.fit(module)
        assert run.global_step == 0
        assert_unchanged(module, before)
        assert files(tmp_path) == on_disk


def test_an_existing_adapter_is_not_overwritten_unless_asked(tmp_path):
    out = tmp_path / "adapter"
    quiet_trainer(
        tmp_path, [PEFTCallback(copy.deepcopy(LORA), save_adapter_to=out, verbose=False)], 2
    ).fit(PlainCausalLM())
    on_disk = files(out)
    assert set(on_disk) == {"adapter_config.json", "adapter_model.safetensors"}

    module = PlainCausalLM()
    before = snapshot(module)
    again = PEFTCallback(copy.deepcopy(LORA), save_adapter_to=out, verbose=False)
    with pytest.raises(InputError, match=rf"{out} already holds an adapter.*overwrite=True"):
        quiet_trainer(tmp_path, [again], 2).fit(module)
    assert_unchanged(module, before)
    assert files(out) == on_disk

    replace = PEFTCallback(copy.deepcopy(LORA), save_adapter_to=out, overwrite=True, verbose=False)
    quiet_trainer(tmp_path, [replace], 3).fit(module)
    assert len(module.losses) == 3 and files(out) != on_disk


class TakeThePath(Callback):
    """Puts a file where the adapter directory should go, once training has started."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_start(self, trainer, pl_module) -> None:
        self.path.write_text("taken\n")


def test_when_writing_the_adapter_fails_it_goes_to_a_fallback_named_in_the_error(tmp_path):
    destination = tmp_path / "adapter"
    callback = PEFTCallback(copy.deepcopy(LORA), save_adapter_to=destination, verbose=False)
    module = PlainCausalLM()
    with pytest.raises(
        RuntimeError,
        match=rf"could not write the trained adapter to {destination} .*written to "
        rf"{tmp_path / 'peft_adapter_fallback'} instead",
    ):
        quiet_trainer(tmp_path, [callback, TakeThePath(destination)], 2).fit(module)
    assert destination.read_text() == "taken\n"
    reloaded = load_adapter(tiny_llama64().eval(), tmp_path / "peft_adapter_fallback")
    ids = random_tokens(4, seed=3)
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=ids).logits, module.model(input_ids=ids).logits, rtol=0, atol=0
        )


def test_resuming_a_finished_run_writes_the_adapter_it_holds(tmp_path, checkpoint):
    """Lightning skips on_train_end when the restored run is already done."""
    out = tmp_path / "adapter"
    module = PlainCausalLM()
    callback = PEFTCallback(copy.deepcopy(LORA), save_adapter_to=out, verbose=False)
    with pytest.warns(UserWarning, match="no training step ran"):
        quiet_trainer(tmp_path, [callback], max_steps=4).fit(module, ckpt_path=checkpoint)
    assert module.losses == []
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    reloaded = load_adapter(tiny_llama64(), out)
    mine = adapter_state_dict(reloaded)
    assert {f"model.{k}" for k in mine} == set(saved)
    for key, value in mine.items():
        assert torch.equal(value, saved[f"model.{key}"]), key


# -- 5. adapters that never act ----------------------------------------------------------------


class Bypass(pl.LightningModule):
    """``bypassed`` is in the module tree, but forward reads its weight directly (as
    ``nn.MultiheadAttention`` does with ``out_proj``): an adapter on it never acts."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.used, self.bypassed, self.head = nn.Linear(6, 5), nn.Linear(6, 5), nn.Linear(5, 1)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        hidden = self.used(batch) + F.linear(batch, self.bypassed.weight, self.bypassed.bias)
        loss = self.head(torch.tanh(hidden)).square().mean()
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)

    def train_dataloader(self):
        return DataLoader(torch.randn(12, 6, generator=torch.Generator().manual_seed(1)), 4)


def _gradient_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "received no gradient" in str(w.message)]


@pytest.mark.parametrize(
    "config",
    [
        LoRAConfig(r=2, target_modules=["used", "bypassed"]),
        AdapterConfig(bottleneck_dim=2, target_modules=["used", "bypassed"]),
    ],
    ids=["lora", "adapter"],
)
def test_an_adapter_that_never_acts_is_named(tmp_path, config):
    module = Bypass()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        quiet_trainer(tmp_path, [PEFTCallback(config, verbose=False)], 3).fit(module)
    (message,) = _gradient_warnings(record)
    assert "1 of the 2 adapters received no gradient in the first step: bypassed" in message
    assert len(module.losses) == 3  # a warning: some modules are legitimately unused in a step


def test_when_no_adapter_acts_training_stops_before_the_first_update(tmp_path):
    module = Bypass()
    config = LoRAConfig(r=2, target_modules=["bypassed"], modules_to_save=["head"])
    before = {k: v.clone() for k, v in module.state_dict().items()}
    run = quiet_trainer(tmp_path, [PEFTCallback(config, verbose=False)], 3)
    with pytest.raises(InputError, match=r"none of the 1 adapters received a gradient.*bypassed"):
        run.fit(module)
    assert run.global_step == 0
    for key, value in module.state_dict().items():
        if key in before:
            assert torch.equal(value, before[key]), key  # no optimizer step


def test_a_normal_run_does_not_warn_about_gradients(tmp_path):
    module = Bypass()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        config = LoRAConfig(r=2, target_modules=["used"])
        quiet_trainer(tmp_path, [PEFTCallback(config, verbose=False)], 3).fit(module)
    assert _gradient_warnings(record) == [] and len(module.losses) == 3
