"""lightning-peft: parameter-efficient fine-tuning for PyTorch Lightning.

The adapter layers, injection, the callback and PEFT-format I/O build on the ``kernels`` ops.
"""

from kernels import dora_linear, lora_linear

__all__ = ["dora_linear", "lora_linear"]
