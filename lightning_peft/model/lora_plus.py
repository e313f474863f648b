"""LoRA+ (Hayou et al. 2024, https://arxiv.org/abs/2402.12354): B learns faster than A."""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_peft.methods.registry import adapter_layers


def lora_plus_param_groups(
    model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: the "B" factors of every low-rank layer (``lora_B``; what each
    layer class lists in ``fast_names``) at ``lr * ratio``, the other trainable parameters (A,
    DoRA magnitudes, adapters, biases, modules_to_save) at ``lr``.

    Example::

        torch.optim.AdamW(lora_plus_param_groups(model, lr=2e-4, ratio=16))
    """
    if ratio <= 0:
        raise ValueError(f"ratio must be > 0, got {ratio}")
    fast = {
        id(layer.get_parameter(name))
        for _, layer in adapter_layers(model)
        for name in type(layer).fast_names
    }
    if not fast:
        raise ValueError("the model has no LoRA layers: inject adapters first")
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [
        {
            "params": [p for p in trainable if id(p) not in fast],
            "lr": lr,
            "weight_decay": weight_decay,
        },
        {
            "params": [p for p in trainable if id(p) in fast],
            "lr": lr * ratio,
            "weight_decay": weight_decay,
        },
    ]
