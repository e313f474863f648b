"""Fused LoRA and DoRA linear ops, forward and backward, for PyTorch.

Standalone: imports neither Lightning nor (until a triton op runs) Triton.

    from kernels import lora_linear, dora_linear, dora_weight_norm

Over a base product computed elsewhere (a quantized layer): ``lora_delta`` (the LoRA branch),
``dora_combine`` (DoRA from the base output and the branch) and ``factored_weight_norm``.

Note: Hugging Face publishes an unrelated distribution whose import name is also ``kernels``;
the two cannot share an environment.
"""

from kernels.adapter_branch import dora_combine, lora_delta
from kernels.backends import BACKEND_ENV_VAR, BACKENDS, available_backends, resolve_backend
from kernels.functional import dora_linear, lora_linear
from kernels.norm import dora_weight_norm, factored_weight_norm, weight_row_sq_norm

__all__ = [
    "BACKENDS",
    "BACKEND_ENV_VAR",
    "available_backends",
    "dora_combine",
    "dora_linear",
    "dora_weight_norm",
    "factored_weight_norm",
    "lora_delta",
    "lora_linear",
    "resolve_backend",
    "weight_row_sq_norm",
]
