"""Several adapters trained in one run: ``PEFTCallback(adapters={...})`` and the batch field
``adapter_names``. Each adapter learns from its own rows only, has its own optimizer group,
resumes exactly from an adapter-only checkpoint, and is written as its own PEFT directory that
peft loads and that reproduces, on its rows, what the trained model gave."""

from __future__ import annotations

import copy
import random

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from peft import PeftModel
from torch.utils.data import DataLoader, Dataset

from lightning_peft import LoRAConfig, PEFTCallback, adapter_param_groups, mixed_batch
from lightning_peft.core.errors import InputError
from lightning_peft.model.helpers import active_state_dict
from tests.helpers.lightning_modules import PlainCausalLM, quiet_trainer, tiny_llama64

ADAPTERS = {
    "default": LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "fr": LoRAConfig(r=2, lora_alpha=4, target_modules=["v_proj", "o_proj"], lora_dropout=0.1),
    "de": LoRAConfig(r=8, lora_alpha=8, target_modules=["q_proj", "k_proj"], use_rslora=True),
}
ROW_NAMES = ["fr", "de", "default", "fr", "__base__", "de", "default", "fr"]


class Rows(Dataset):
    """Learnable token rows, each with the adapter it trains (``adapter_names``)."""

    def __init__(self, names=ROW_NAMES, n: int = 32, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 128, (n, 4), generator=gen).repeat(1, 3)
        self.names = [names[i % len(names)] for i in range(n)]

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "adapter_names": self.names[i]}


class MultiLM(PlainCausalLM):
    """Next-token loss; one AdamW group per adapter (``adapter_param_groups``)."""

    def __init__(self, data=None, **kwargs):
        super().__init__(**kwargs)
        self.data = data or Rows()

    def training_step(self, batch, batch_idx):
        assert "adapter_names" not in batch  # the callback took it out
        ids = batch["input_ids"]
        loss = self.model(input_ids=ids, labels=ids).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(adapter_param_groups(self.model, lr=self.lr))

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=8)


def callback(**kwargs):
    return PEFTCallback(adapters=copy.deepcopy(ADAPTERS), verbose=False, **kwargs)


def test_each_adapter_trains_from_its_rows_in_its_group_and_loads_in_peft(tmp_path):
    pl.seed_everything(0, verbose=False)
    module = MultiLM()
    run = quiet_trainer(tmp_path, [callback(save_adapter_to=tmp_path / "out")], max_steps=4)
    run.fit(module)
    groups = run.optimizers[0].param_groups
    assert [g["name"] for g in groups] == ["default", "fr", "de"]
    assert all(len(g["params"]) for g in groups)
    out = tmp_path / "out"
    assert (out / "adapter_config.json").is_file()
    assert all((out / n / "adapter_model.safetensors").is_file() for n in ("fr", "de"))
    model = module.model.eval()
    ids = Rows().ids[:8]
    with torch.no_grad(), mixed_batch(model, ROW_NAMES):
        trained = model(input_ids=ids).logits
    theirs = PeftModel.from_pretrained(tiny_llama64(), out)
    for name in ("fr", "de"):
        theirs.load_adapter(out / name, adapter_name=name)
    theirs.eval()
    for name in ADAPTERS:
        rows = [i for i, n in enumerate(ROW_NAMES) if n == name]
        theirs.set_adapter(name)
        with torch.no_grad():
            expected = theirs(input_ids=ids[rows]).logits
        torch.testing.assert_close(trained[rows], expected, atol=2e-5, rtol=1e-4)


class GradientsAtFirstStep(pl.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = {
            n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None
        }


def test_changing_one_adapter_s_rows_leaves_the_others_gradients_bit_equal(tmp_path):
    def first_grads(data):
        pl.seed_everything(0, verbose=False)
        capture = GradientsAtFirstStep()
        adapters = {n: copy.deepcopy(c) for n, c in ADAPTERS.items()}
        adapters["fr"].lora_dropout = 0.0  # the same draws in both runs either way; plainer
        cb = PEFTCallback(adapters=adapters, verbose=False)
        quiet_trainer(tmp_path, [cb, capture], max_steps=1).fit(MultiLM(data=data))
        return capture.grads

    data = Rows()
    before = first_grads(data)
    changed = Rows()
    de_rows = [i for i, n in enumerate(changed.names) if n == "de"]
    changed.ids[de_rows] = (changed.ids[de_rows] + 5) % 128
    after = first_grads(changed)
    de = [k for k in before if ".named_adapters.de." in k or "k_proj.lora" in k]
    others = [k for k in before if k not in de]
    assert de and others and before.keys() == after.keys()
    for key in others:
        assert torch.equal(before[key], after[key]), key
    assert any(not torch.equal(before[k], after[k]) for k in de)


class CaptureStart(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        self.adapters = {k: v.clone() for k, v in active_state_dict(pl_module).items()}
        self.optimizer = copy.deepcopy(trainer.optimizers[0].state_dict())


class CaptureEnd(pl.Callback):
    def on_train_end(self, trainer, pl_module):
        self.adapters = {k: v.clone() for k, v in active_state_dict(pl_module).items()}
        self.optimizer = copy.deepcopy(trainer.optimizers[0].state_dict())


def test_an_adapter_only_checkpoint_holds_every_adapter_and_resumes_exactly(tmp_path):
    pl.seed_everything(0, verbose=False)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="epoch")
    end = CaptureEnd()
    quiet_trainer(tmp_path / "first", [callback(), saver, end], max_epochs=1).fit(MultiLM())
    saved = torch.load(saver.best_model_path, weights_only=True)["state_dict"]
    assert saved.keys() == set(end.adapters)  # every adapter's tensors, nothing frozen
    assert any(".named_adapters.fr." in k for k in saved)
    torch.manual_seed(1234), random.seed(1234), np.random.seed(1234)  # a new process
    start = CaptureStart()
    resumed = quiet_trainer(tmp_path / "resumed", [callback(), start], max_epochs=2)
    resumed.fit(MultiLM(), ckpt_path=saver.best_model_path)
    assert start.adapters.keys() == end.adapters.keys()
    for key, value in end.adapters.items():
        assert torch.equal(start.adapters[key], value), key
    for index, state in end.optimizer["state"].items():
        for name, value in state.items():
            restored = start.optimizer["state"][index][name]
            assert torch.equal(torch.as_tensor(restored), torch.as_tensor(value))
    other = {**copy.deepcopy(ADAPTERS), "it": LoRAConfig(r=2, target_modules=["q_proj"])}
    with pytest.raises(InputError, match="trained with other adapters"):
        quiet_trainer(
            tmp_path / "other", [PEFTCallback(adapters=other, verbose=False)], max_epochs=2
        ).fit(MultiLM(), ckpt_path=saver.best_model_path)


@pytest.mark.parametrize(
    ("names", "match"),
    [
        (["fr", "it"] * 4, "no adapter named 'it'"),
        (None, "field 'adapter_names'"),
    ],
)
def test_a_bad_batch_field_stops_fit_before_any_step(tmp_path, names, match):
    class NoField(Rows):
        def __getitem__(self, i):
            return {"input_ids": self.ids[i]}

    data = NoField() if names is None else Rows(names=names)
    module = MultiLM(data=data)
    run = quiet_trainer(tmp_path, [callback()], max_steps=2)
    with pytest.raises(InputError, match=match):
        run.fit(module)
    assert run.global_step == 0 and module.losses == []


def test_config_and_adapters_together_or_merge_on_train_end_are_refused():
    with pytest.raises(ValueError, match="a config or adapters"):
        PEFTCallback(LoRAConfig(target_modules=["q_proj"]), adapters=ADAPTERS)
    with pytest.raises(ValueError, match="merge_on_train_end with adapters"):
        PEFTCallback(adapters=ADAPTERS, merge_on_train_end=True)
    with pytest.raises(ValueError, match="invalid adapter name"):
        PEFTCallback(adapters={"a/b": LoRAConfig(target_modules=["q_proj"])})
