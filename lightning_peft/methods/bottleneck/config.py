"""``AdapterConfig``: bottleneck adapters (Houlsby et al. 2019,
https://arxiv.org/abs/1902.00751). Invalid values raise at construction, listing the choices.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from lightning_peft.core.config import ALL_LINEAR, check_shared_fields, is_positive_int

ACTIVATION_CHOICES = ("relu", "gelu", "silu", "tanh", "identity")


@dataclass
class AdapterConfig:
    """Bottleneck adapters (Houlsby et al. 2019): ``h + scaling · up(act(down(dropout(h))))``.

    Each target module's output ``h`` (its first element when it returns a tuple) goes through
    the adapter; ``up`` starts at zero, so the adapted model starts equal to the base model.

    Args:
        bottleneck_dim: the adapter's hidden size (>= 1).
        target_modules: as in ``LoRAConfig`` (no ``"all-linear"``).
        activation: one of ``ACTIVATION_CHOICES``.
        dropout: dropout probability on the adapter input.
        scaling: the factor on the adapter's output.
        modules_to_save, bias, adapter_dtype: as in ``LoRAConfig`` (bias "lora_only" means the
            biases of the adapted modules).
    """

    bottleneck_dim: int = 64
    target_modules: list[str] | str | None = None
    activation: str = "relu"
    dropout: float = 0.0
    scaling: float = 1.0
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    bias: str = "none"
    adapter_dtype: str = "float32"

    def __post_init__(self) -> None:
        if not is_positive_int(self.bottleneck_dim):
            raise ValueError(f"bottleneck_dim must be an integer >= 1, got {self.bottleneck_dim!r}")
        check_shared_fields(self)
        if self.target_modules == ALL_LINEAR:
            raise ValueError("AdapterConfig does not take 'all-linear'; name the target modules")
        if self.activation not in ACTIVATION_CHOICES:
            raise ValueError(
                f"activation must be one of {ACTIVATION_CHOICES}, got {self.activation!r}"
            )
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not math.isfinite(float(self.scaling)):
            raise ValueError(f"scaling must be finite, got {self.scaling!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
