"""LightningModules written as a user would, around tiny transformers models."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader


def tiny_llama64(seed: int = 0):
    """A LlamaForCausalLM with hidden size 64 and 2 layers, built from a config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    return LlamaForCausalLM(config)


def random_tokens(n: int = 64, length: int = 16, seed: int = 0) -> torch.Tensor:
    """Sequences that repeat a short random pattern: learnable, so the loss can go down."""
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.randint(0, 128, (n, 4), generator=gen)
    return patterns.repeat(1, length // 4)


class CausalLM(pl.LightningModule):
    """Next-token loss on a tiny Llama; nothing in it knows about adapters."""

    def __init__(self, lr: float = 3e-2, seed: int = 0, build_in_configure_model: bool = False):
        super().__init__()
        self.lr, self.seed = lr, seed
        self.build_in_configure_model = build_in_configure_model
        self.model = None if build_in_configure_model else tiny_llama64(seed)
        self.losses: list[float] = []

    def configure_model(self) -> None:
        if self.model is None:
            self.model = tiny_llama64(self.seed)

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch, labels=batch).loss
        self.losses.append(loss.item())
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)

    def train_dataloader(self):
        return DataLoader(random_tokens(), batch_size=8)
