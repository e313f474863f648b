"""bitsandbytes-quantized layers and tiny models for the QLoRA tests (skipped without it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_peft.core.bnb import bitsandbytes_kind, disable_cpu_inference_packing

NEEDS_BNB = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed"
)
# (quant_type, double quantization): the four 4-bit formats.
FORMATS_4BIT = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]


def linear_4bit(
    in_features: int,
    out_features: int,
    *,
    bias: bool = True,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    seed: int = 0,
    device: str = "cpu",
) -> tuple[nn.Linear, nn.Module]:
    """A float ``nn.Linear`` and a bitsandbytes ``Linear4bit`` quantized from it on ``device``."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    quantized = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=bias,
        compute_dtype=compute_dtype,
        quant_type=quant_type,
        compress_statistics=double_quant,
    )
    quantized.load_state_dict(linear.state_dict())
    return linear, quantized.to(device)  # bitsandbytes quantizes on the move


def linear_8bit(in_features: int, out_features: int, *, bias: bool = True, seed: int = 0):
    """A float ``nn.Linear`` and a bitsandbytes ``Linear8bitLt`` (int8 weights) from it."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    quantized = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias, has_fp16_weights=False)
    quantized.load_state_dict(linear.state_dict())
    return linear, quantized.to("cpu")


class QuantizedSmallModel(nn.Module):
    """Two quantized linear layers (with and without bias, sizes no multiple of anything, so
    4-bit blocks straddle rows) and a float head; takes (..., 11)."""

    def __init__(self, kind: str = "nf4", seed: int = 0):
        super().__init__()
        if kind == "int8":
            self.proj = linear_8bit(11, 9, seed=seed)[1]
            self.proj_nobias = linear_8bit(9, 7, bias=False, seed=seed + 1)[1]
        else:
            self.proj = linear_4bit(11, 9, quant_type=kind, seed=seed)[1]
            self.proj_nobias = linear_4bit(9, 7, bias=False, quant_type=kind, seed=seed + 1)[1]
        torch.manual_seed(seed + 2)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.proj_nobias(torch.tanh(self.proj(x)))))

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randn(4, 11, generator=torch.Generator().manual_seed(3))


def no_cpu_packing(model: nn.Module) -> nn.Module:
    """Keep bitsandbytes' layers in their standard layout in eval mode (as adapted layers do):
    without this, bitsandbytes 0.50 on an AVX512-BF16 CPU runs an eval forward of a bare
    ``Linear4bit`` in bf16, so a peft reference would differ from ours by bf16 rounding."""
    for module in model.modules():
        if bitsandbytes_kind(module):
            disable_cpu_inference_packing(module)
    return model


def save_tiny_llama(directory: Path, seed: int = 0) -> Path:
    """A tiny float Llama (hidden 32, 2 layers) saved as a transformers directory."""
    from tests.helpers.tiny_models import tiny_llama

    tiny_llama(seed).save_pretrained(directory)
    return directory


def load_tiny_4bit(directory: Path, mode: str = "nf4", **kwargs) -> nn.Module:
    """The tiny Llama of ``directory`` loaded quantized by transformers, reference-ready."""
    from lightning_peft.lightning.precision import load_quantized

    return no_cpu_packing(load_quantized(directory, mode, **kwargs))
