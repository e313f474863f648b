"""LoRA, rsLoRA and DoRA (with PiSSA and OLoRA inits and ``lora_bias``): the config (``config``),
the shared layer base and variants (``base``), one module per layer type (``linear``, ``conv``,
``embedding``, ``mha``, ``quantized``; ``param_layer`` and ``experts`` for ``target_parameters``,
selected in ``param_targets``), the registered method and its ``adapter_config.json``
(``method``)."""

from lightning_peft.methods.lora.base import DoRAVariant, LoRALayer, LoRAVariant
from lightning_peft.methods.lora.config import LoRAConfig
from lightning_peft.methods.lora.conv import LoRAConv
from lightning_peft.methods.lora.embedding import LoRAEmbedding
from lightning_peft.methods.lora.experts import LoRAExperts
from lightning_peft.methods.lora.linear import LoRALinear
from lightning_peft.methods.lora.method import LORA
from lightning_peft.methods.lora.mha import LoRAMultiheadAttention
from lightning_peft.methods.lora.param_layer import LoRAParameter
from lightning_peft.methods.lora.quantized import QuantizedLoRALinear

__all__ = [
    "LORA",
    "DoRAVariant",
    "LoRAConfig",
    "LoRAConv",
    "LoRAEmbedding",
    "LoRAExperts",
    "LoRALayer",
    "LoRALinear",
    "LoRAMultiheadAttention",
    "LoRAParameter",
    "LoRAVariant",
    "QuantizedLoRALinear",
]
