"""Fused LoRA and DoRA linear ops, forward and backward, for PyTorch; (IA)³ scaling ops.

Standalone: imports neither Lightning nor (until a triton op runs) Triton.

    from kernels import lora_linear, dora_linear, dora_weight_norm

Note: Hugging Face publishes an unrelated distribution whose import name is also ``kernels``;
the two cannot share an environment.
"""

from kernels.backends import BACKEND_ENV_VAR, BACKENDS, available_backends, resolve_backend
from kernels.functional import dora_linear, lora_linear
from kernels.ia3 import ia3_linear, ia3_merge, ia3_scale, ia3_weight_factor
from kernels.norm import dora_weight_norm, weight_row_sq_norm

__all__ = [
    "BACKENDS",
    "BACKEND_ENV_VAR",
    "available_backends",
    "dora_linear",
    "dora_weight_norm",
    "ia3_linear",
    "ia3_merge",
    "ia3_scale",
    "ia3_weight_factor",
    "lora_linear",
    "resolve_backend",
    "weight_row_sq_norm",
]
