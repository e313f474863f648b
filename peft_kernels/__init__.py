"""Fused LoRA and DoRA linear ops, forward and backward, for PyTorch; LoRA and DoRA on
convolutions and embeddings, and (IA)³ scaling (plain autograd ops).

Standalone: imports neither Lightning nor (until a triton op runs) Triton.

    from peft_kernels import lora_linear, dora_linear, dora_weight_norm
    from peft_kernels import lora_conv, dora_conv, lora_embedding, dora_embedding

Over a base product computed elsewhere (a quantized layer): ``lora_delta`` (the LoRA branch),
``dora_combine`` (DoRA from the base output and the branch) and ``factored_weight_norm``.

Many adapters at once (mixed-adapter batches, LoRA on mixture-of-experts experts):
``grouped_lora_delta`` (segmented LoRA, Punica's SGMV), ``mixed_lora_linear``,
``grouped_lora_linear`` (over a ``RowGroups`` made once per batch), ``group_rows``, ``pad_factors``.

Note: Hugging Face publishes an unrelated distribution whose import name is also ``peft_kernels``;
the two cannot share an environment.
"""

from peft_kernels.adapter_branch import dora_combine, lora_delta
from peft_kernels.backends import BACKEND_ENV_VAR, BACKENDS, available_backends, resolve_backend
from peft_kernels.conv import conv_delta_weight, conv_dora_weight_norm, dora_conv, lora_conv
from peft_kernels.embedding import (
    dora_embedding,
    embedding_delta_weight,
    embedding_dora_weight_norm,
    embedding_weight_sq_norm,
    lora_embedding,
)
from peft_kernels.functional import dora_linear, lora_linear
from peft_kernels.grouped import (
    group_rows,
    grouped_lora_delta,
    grouped_lora_linear,
    mixed_lora_linear,
    pad_factors,
)
from peft_kernels.ia3 import ia3_linear, ia3_merge, ia3_scale, ia3_weight_factor
from peft_kernels.norm import dora_weight_norm, factored_weight_norm, weight_row_sq_norm
from peft_kernels.row_groups import RowGroups

__all__ = [
    "BACKENDS",
    "BACKEND_ENV_VAR",
    "RowGroups",
    "available_backends",
    "conv_delta_weight",
    "conv_dora_weight_norm",
    "dora_combine",
    "dora_conv",
    "dora_embedding",
    "dora_linear",
    "dora_weight_norm",
    "embedding_delta_weight",
    "embedding_dora_weight_norm",
    "embedding_weight_sq_norm",
    "factored_weight_norm",
    "group_rows",
    "grouped_lora_delta",
    "grouped_lora_linear",
    "ia3_linear",
    "ia3_merge",
    "ia3_scale",
    "ia3_weight_factor",
    "lora_conv",
    "lora_delta",
    "lora_embedding",
    "lora_linear",
    "mixed_lora_linear",
    "pad_factors",
    "resolve_backend",
    "weight_row_sq_norm",
]
