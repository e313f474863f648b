"""Real ``peft`` LoRA/DoRA layers holding given weights, for parity tests."""

from __future__ import annotations

import torch
from torch import nn


class FixedDropout(nn.Module):
    """Stands in for peft's ``nn.Dropout``: applies a given keep-mask, scaled by 1/(1−p)."""

    def __init__(self, keep: torch.Tensor, p: float):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        return x * self.keep.to(x.dtype) / (1 - self.p)


def peft_linear(
    inputs: dict,
    *,
    use_dora: bool,
    rank: int,
    lora_alpha: float,
    use_rslora: bool = False,
    keep: torch.Tensor | None = None,
    p: float = 0.0,
):
    """A peft-adapted one-Linear model carrying ``inputs``' tensors; returns (model, lora layer)."""
    import peft

    weight = inputs["weight"]
    out_features, in_features = weight.shape
    model = nn.Sequential()
    model.add_module(
        "proj",
        nn.Linear(in_features, out_features, bias=inputs["bias"] is not None, dtype=weight.dtype),
    )
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=lora_alpha,
        target_modules=["proj"],
        use_dora=use_dora,
        use_rslora=use_rslora,
        lora_dropout=0.0,
        bias="all" if inputs["bias"] is not None else "none",
    )
    model = peft.get_peft_model(model, config)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.base_layer.weight.copy_(weight)
        if inputs["bias"] is not None:
            layer.base_layer.bias.copy_(inputs["bias"])
        layer.lora_A["default"].weight.copy_(inputs["lora_A"])
        layer.lora_B["default"].weight.copy_(inputs["lora_B"])
        if use_dora:
            layer.lora_magnitude_vector["default"].weight.copy_(inputs["magnitude"])
    if keep is not None:
        layer.lora_dropout["default"] = FixedDropout(keep, p)
    model.train()
    return model, layer
