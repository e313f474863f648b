"""LoRA, rsLoRA and DoRA (with PiSSA and OLoRA inits and ``lora_bias``): the config (``config``),
the shared layer base and variants (``base``), one module per layer type (``linear``, ``conv``,
``embedding``, ``mha``, ``quantized``), the registered method and its ``adapter_config.json``
(``method``)."""

from lightning_peft.methods.lora.base import DoRAVariant, LoRALayer, LoRAVariant
from lightning_peft.methods.lora.config import LoRAConfig
from lightning_peft.methods.lora.conv import LoRAConv
from lightning_peft.methods.lora.embedding import LoRAEmbedding
from lightning_peft.methods.lora.linear import LoRALinear
from lightning_peft.methods.lora.method import LORA
from lightning_peft.methods.lora.mha import LoRAMultiheadAttention
from lightning_peft.methods.lora.quantized import QuantizedLoRALinear

__all__ = [
    "LORA",
    "DoRAVariant",
    "LoRAConfig",
    "LoRAConv",
    "LoRAEmbedding",
    "LoRALayer",
    "LoRALinear",
    "LoRAMultiheadAttention",
    "LoRAVariant",
    "QuantizedLoRALinear",
]
