"""Where ``LoRALinear`` used to live: it is in ``lightning_peft.methods.lora`` now."""

from lightning_peft.methods.base import is_conv1d, is_linear_like, keep_adapter_dtype
from lightning_peft.methods.lora import DoRAVariant, LoRALinear, LoRAVariant

__all__ = [
    "DoRAVariant",
    "LoRALinear",
    "LoRAVariant",
    "is_conv1d",
    "is_linear_like",
    "keep_adapter_dtype",
]
