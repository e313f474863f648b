"""Adapter configurations.

``LoRAConfig`` uses `peft`'s field names and defaults (``peft.LoraConfig``), so an existing
config carries over; ``AdapterConfig`` describes bottleneck adapters (Houlsby et al. 2019,
https://arxiv.org/abs/1902.00751). Invalid values raise at construction, listing the choices.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

ALL_LINEAR = "all-linear"
BIAS_CHOICES = ("none", "all", "lora_only")
INIT_CHOICES = (True, False, "gaussian", "pissa")
ACTIVATION_CHOICES = ("relu", "gelu", "silu", "tanh", "identity")


def _check_targets(name: str, value: Any, allow_none: bool) -> list[str] | str | None:
    """A list/tuple/set of names becomes a sorted list; a string must be a valid regex."""
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{name} is required: a list of module names, a regex, or 'all-linear'")
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(
                f"{name}={value!r} is not a valid regular expression: {error}"
            ) from None
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        if not value:
            raise ValueError(f"{name} must not be empty")
        return sorted(set(value))
    raise ValueError(f"{name} must be a list of module names or a regex string, got {value!r}")


DTYPE_CHOICES = ("float32", "float64", "bfloat16", "float16")


def _check_shared(config: LoRAConfig | AdapterConfig) -> None:
    """Checks of the fields both configs have; normalises the target lists."""
    config.target_modules = _check_targets("target_modules", config.target_modules, False)
    config.exclude_modules = _check_targets("exclude_modules", config.exclude_modules, True)
    if config.modules_to_save is not None:
        config.modules_to_save = _check_targets(
            "modules_to_save", list(config.modules_to_save), False
        )
    if config.bias not in BIAS_CHOICES:
        raise ValueError(f"bias must be one of {BIAS_CHOICES}, got {config.bias!r}")
    if config.adapter_dtype not in DTYPE_CHOICES:
        raise ValueError(
            f"adapter_dtype must be one of {DTYPE_CHOICES}, got {config.adapter_dtype!r}"
        )


def _check_patterns(name: str, patterns: dict, kind: type) -> dict:
    if not isinstance(patterns, dict):
        raise ValueError(f"{name} must be a dict of regex -> {kind.__name__}, got {patterns!r}")
    for pattern, value in patterns.items():
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"{name} key {pattern!r} is not a valid regex: {error}") from None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name}[{pattern!r}] must be a positive number, got {value!r}")
    return dict(patterns)


@dataclass
class LoRAConfig:
    """LoRA / rsLoRA / DoRA / PiSSA configuration with peft's field names and defaults.

    Args:
        r: rank (>= 1).
        lora_alpha: α; the scaling is ``α / r`` (``α / √r`` with ``use_rslora``).
        lora_dropout: dropout probability on the adapter input, in [0, 1).
        target_modules: a list of names, each matching a module's whole name or a ``.name``
            suffix; a string is a full-match regex; ``"all-linear"`` is every ``nn.Linear`` /
            ``Conv1D`` except a transformers model's output layer.
        exclude_modules: names or a regex, as ``target_modules``, never adapted.
        bias: ``"none"`` | ``"all"`` (every bias trains) | ``"lora_only"`` (biases of adapted
            layers train).
        use_rslora: rank-stabilised scaling ``α / √r`` (Kalajdzievski 2023).
        use_dora: weight-decomposed LoRA (Liu et al. 2024).
        init_lora_weights: ``True`` (A kaiming-uniform, B zero), ``"gaussian"`` (A ~ N(0, 1/r),
            B zero), ``"pissa"`` (A, B from the top-r SVD of W; W becomes its residual),
            ``False`` (A and B both random: for tests).
        modules_to_save: modules (names as ``target_modules`` lists) trained and saved in full.
        layers_to_transform: layer indices (an int or a list) to adapt, read from the first
            ``<name>.<index>.`` in a module's path (or ``layers_pattern``'s).
        layers_pattern: the name before the layer index, e.g. ``"layers"``.
        rank_pattern / alpha_pattern: ``{regex: value}`` overriding ``r`` / ``lora_alpha`` for
            matching modules (peft's rule: ``(.*\\.)?(regex)$``, first match wins).
        adapter_dtype: the dtype the adapter weights are kept in (default float32).
        backend: the ``kernels`` backend ("auto" | "naive" | "torch" | "triton").
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    adapter_dtype: str = "float32"
    backend: str = "auto"

    method: ClassVar[str] = "lora"

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be an integer >= 1, got {self.r!r}")
        if not isinstance(self.lora_alpha, (int, float)) or not math.isfinite(self.lora_alpha):
            raise ValueError(f"lora_alpha must be a finite number, got {self.lora_alpha!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        _check_shared(self)
        init = self.init_lora_weights
        if not (isinstance(init, bool) or init in INIT_CHOICES):
            raise ValueError(
                f"init_lora_weights must be one of {INIT_CHOICES}, got {self.init_lora_weights!r}"
            )
        if self.layers_to_transform is not None:
            layers = self.layers_to_transform
            layers = [layers] if isinstance(layers, int) else list(layers)
            if not layers or not all(isinstance(i, int) and i >= 0 for i in layers):
                raise ValueError(
                    "layers_to_transform must be an int or a list of ints >= 0, "
                    f"got {self.layers_to_transform!r}"
                )
        self.rank_pattern = _check_patterns("rank_pattern", self.rank_pattern, int)
        self.alpha_pattern = _check_patterns("alpha_pattern", self.alpha_pattern, float)
        from kernels import BACKENDS

        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """The (r, α) for ``module_name`` after ``rank_pattern`` / ``alpha_pattern``."""
        return (
            _pattern_value(self.rank_pattern, module_name, self.r),
            _pattern_value(self.alpha_pattern, module_name, self.lora_alpha),
        )

    def scaling_for(self, rank: int, alpha: float) -> float:
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pattern_value(patterns: dict, module_name: str, default):
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return value
    return default


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

    method: ClassVar[str] = "adapter"

    def __post_init__(self) -> None:
        if (
            isinstance(self.bottleneck_dim, bool)
            or not isinstance(self.bottleneck_dim, int)
            or self.bottleneck_dim < 1
        ):
            raise ValueError(f"bottleneck_dim must be an integer >= 1, got {self.bottleneck_dim!r}")
        _check_shared(self)
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
