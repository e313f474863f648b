"""LightningModules written as a user would, around tiny transformers models.

They differ only in where the model is built: ``PlainCausalLM`` in ``__init__`` with no
``configure_model`` (the most common module), ``SetupCausalLM`` in ``setup``, and ``CausalLM`` in
``__init__`` or (``build_in_configure_model=True``) in ``configure_model``. Also the quiet
one-CPU ``Trainer``s the Lightning tests run them in, and callbacks that capture the adapters and
the optimizer state at the start and the end of training.
"""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_peft import adapter_state_dict
from tests.helpers.tiny_models import tiny_llama


def tiny_llama64(seed: int = 0, num_layers: int = 2):
    """A LlamaForCausalLM with hidden size 64 and ``num_layers`` layers, built from a config, in
    train mode."""
    return tiny_llama(
        seed, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, vocab_size=128
    ).train()


def random_tokens(n: int = 64, length: int = 16, seed: int = 0) -> torch.Tensor:
    """Sequences that repeat a short random pattern: learnable, so the loss can go down."""
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.randint(0, 128, (n, 4), generator=gen)
    return patterns.repeat(1, length // 4)


class PlainCausalLM(pl.LightningModule):
    """Next-token loss on a tiny Llama built in ``__init__``; nothing in it knows about adapters,
    and it has no ``configure_model``.

    Args:
        lr: AdamW's learning rate.
        seed: the base model's seed.
        shuffle: shuffle the training data: ``"default"`` from the default generator,
            ``"generator"`` from the DataLoader's own generator (seeded by ``seed``).
        num_layers: the Llama's layers.
    """

    def __init__(
        self, lr: float = 3e-2, seed: int = 0, shuffle: str | None = None, num_layers: int = 2
    ):
        super().__init__()
        self.lr, self.seed, self.shuffle, self.num_layers = lr, seed, shuffle, num_layers
        self.model = self.build_model() if self.builds_in_init() else None
        self.losses: list[float] = []

    def builds_in_init(self) -> bool:
        return True

    def build_model(self):
        return tiny_llama64(self.seed, self.num_layers)

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch, labels=batch).loss
        self.losses.append(loss.item())
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)

    def train_dataloader(self):
        generator = None
        if self.shuffle == "generator":
            generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            random_tokens(), batch_size=8, shuffle=self.shuffle is not None, generator=generator
        )


class SetupCausalLM(PlainCausalLM):
    """Builds the model in ``LightningModule.setup`` (after ``Callback.setup``)."""

    def builds_in_init(self) -> bool:
        return False

    def setup(self, stage: str) -> None:
        if self.model is None:
            self.model = self.build_model()


class CausalLM(PlainCausalLM):
    """Defines ``configure_model``; builds the model there with ``build_in_configure_model``."""

    def __init__(self, *args, build_in_configure_model: bool = False, **kwargs):
        self.build_in_configure_model = build_in_configure_model
        super().__init__(*args, **kwargs)

    def builds_in_init(self) -> bool:
        return not self.build_in_configure_model

    def configure_model(self) -> None:
        if self.model is None:
            self.model = self.build_model()


def quiet_trainer(root, callbacks, max_steps: int = -1, **kwargs) -> pl.Trainer:
    """A one-CPU ``Trainer`` writing under ``root``, without progress bar, summary or logger;
    it checkpoints only where a ``ModelCheckpoint`` is given. ``kwargs`` may override the
    accelerator, devices, logger and checkpointing too."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    checkpoints = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    defaults = {"accelerator": "cpu", "devices": 1, "logger": False}
    kwargs = {**defaults, "enable_checkpointing": checkpoints, **kwargs}
    return pl.Trainer(
        max_steps=max_steps,
        default_root_dir=root,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kwargs,
    )


def trainer(root, callbacks, max_steps: int = 6, **kwargs) -> pl.Trainer:
    """``quiet_trainer`` with Lightning's default checkpointing (its own ``ModelCheckpoint``
    where none is given)."""
    return quiet_trainer(root, callbacks, max_steps, **{"enable_checkpointing": True, **kwargs})


class CaptureOnTrainStart(pl.Callback):
    """The adapters, the optimizer state and the step when training starts (after a resume)."""

    def on_train_start(self, trainer, pl_module):
        self.adapters = {k: v.clone() for k, v in adapter_state_dict(pl_module).items()}
        self.optimizer = copy.deepcopy(trainer.optimizers[0].state_dict())
        self.step = trainer.global_step


class CaptureOnTrainEnd(pl.Callback):
    """The adapters and the optimizer state when training ends."""

    def on_train_end(self, trainer, pl_module):
        self.adapters = {k: v.clone() for k, v in adapter_state_dict(pl_module).items()}
        self.optimizer = copy.deepcopy(trainer.optimizers[0].state_dict())


def assert_resumed_exactly(resumed_start: CaptureOnTrainStart, first_end: CaptureOnTrainEnd):
    """The adapters and the optimizer state a resumed run starts from are those the first run
    ended with, tensor for tensor."""
    assert resumed_start.adapters.keys() == first_end.adapters.keys()
    for key, value in first_end.adapters.items():
        assert torch.equal(resumed_start.adapters[key], value), key
    saved, restored = first_end.optimizer["state"], resumed_start.optimizer["state"]
    assert saved.keys() == restored.keys() and saved
    for index, state in saved.items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(restored[index][name]), torch.as_tensor(value))
