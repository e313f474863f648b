"""``LoRAConfig``: peft's field names and defaults (``peft.LoraConfig``), so an existing config
carries over. Invalid values raise at construction, listing the choices.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning_peft.core.config import (
    check_peft_type,
    check_shared_fields,
    check_task_type,
    is_positive_int,
    with_task_heads,
)
from peft_kernels import BACKENDS

INIT_CHOICES = (True, False, "gaussian", "pissa", "olora")


REWRITES_BASE = ("pissa", "olora")  # inits that replace W by its residual (linear layers only)


# peft's other inits, and why they are not available for new adapters here.
PEFT_INITS_NOT_HERE = {
    "eva": "initialises A from activations over a data set",
    "orthogonal": "draws orthogonal random A and B",
    "corda": "rewrites the base weight from activation statistics of a data set",
    "loftq": "quantizes the base weight and fits A and B to the quantization error",
    "lora_ga": "rewrites the base weight from gradients of a data set",
    "mica": "is a LoRA variant with B frozen",
    "pissa_niter_": "computes PiSSA with a randomized SVD, which draws from the global RNG",
}


# peft ``LoraConfig`` fields that do not change the adapted model: accepted and not kept
# (metadata, runtime options, settings of inits that are refused when they would matter; peft
# itself decides ``fan_in_fan_out`` from the layer type, as this package does).
PEFT_IGNORED_FIELDS = (
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "fan_in_fan_out",
    "megatron_core",
    "qalora_group_size",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "runtime_config",
)


# peft ``LoraConfig`` fields that would change the adapted model, with the value that does not:
# any other value is refused by name until the feature exists here.
PEFT_UNSUPPORTED_FIELDS = {
    "trainable_token_indices": None,
    "layer_replication": None,
    "megatron_config": None,
    "use_qalora": False,
    "use_bdlora": None,
    "velora_config": None,
    "alora_invocation_tokens": None,
    "monteclora_config": None,
    "arrow_config": None,
    "kasa_config": None,
    "ensure_weight_tying": False,
}


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


def lora_scaling(rank: int, alpha: float, use_rslora: bool) -> float:
    """The update's scale: ``α / r``, or ``α / √r`` with rsLoRA (Kalajdzievski 2023,
    https://arxiv.org/abs/2312.03732)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclass
class LoRAConfig:
    """LoRA / rsLoRA / DoRA / PiSSA / OLoRA configuration with peft's field names and defaults.

    ``LoRAConfig(**peft.LoraConfig(...).to_dict())`` works whenever the peft config uses only
    what this package has: the fields in ``PEFT_IGNORED_FIELDS`` do not change the adapted model
    and are accepted (kept as given, not compared, not in ``to_dict()``); those in
    ``PEFT_UNSUPPORTED_FIELDS`` are refused by name unless they hold peft's default.

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
            ``"olora"`` (A, B from the QR decomposition of W; W becomes its residual),
            ``False`` (A and B both random: for tests). Embeddings: A zero, B ~ N(0, 1) for
            ``True`` and ``"gaussian"`` (peft's); PiSSA and OLoRA are for linear layers.
        lora_bias: a trainable bias on B (``y += s·b_B``), starting at zero; peft's rules: not
            with DoRA, only with ``init_lora_weights`` True or False, not on embeddings, and a
            layer without a bias of its own cannot merge it.
        modules_to_save: modules (names as ``target_modules`` lists) trained and saved in full.
        layers_to_transform: layer indices (an int or a list) to adapt, read from the first
            ``<name>.<index>.`` in a module's path (or ``layers_pattern``'s).
        layers_pattern: the name before the layer index, e.g. ``"layers"``.
        rank_pattern / alpha_pattern: ``{regex: value}`` overriding ``r`` / ``lora_alpha`` for
            matching modules (peft's rule: ``(.*\\.)?(regex)$``, first match wins).
        task_type: as peft's: ``"SEQ_CLS"`` and ``"TOKEN_CLS"`` add ``classifier`` and ``score``
            to ``modules_to_save``, ``"QUESTION_ANS"`` adds ``qa_outputs`` (so ``all-linear``
            leaves the head out of LoRA and trains it in full); the LM and feature-extraction
            types change nothing.
        adapter_dtype: the dtype the adapter weights are kept in (default float32).
        backend: the ``peft_kernels`` backend ("auto" | "naive" | "torch" | "triton").
        target_parameters: parameters adapted by name, as peft's: an entry names
            ``<module>.<parameter>`` whole or by its ending (``"gate_up_proj"``,
            ``"gate.weight"``); 3-D expert parameters of transformers' mixture-of-experts
            modules are adapted per expert (A (r·E, in), B (out, r·E)), 2-D ones as linear
            weights. With it, ``target_modules`` may be None. On a transformers-5 MoE model,
            peft's v4-name rewrite applies (``methods/lora/param_targets.py``).
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
    lora_bias: bool = False
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    task_type: str | None = None
    adapter_dtype: str = "float32"
    backend: str = "auto"
    target_parameters: list[str] | None = None
    # peft's other fields (see the class docstring): accepted, inert, left out of to_dict().
    peft_type: Any = field(default="LORA", repr=False, compare=False)
    auto_mapping: Any = field(default=None, repr=False, compare=False)
    peft_version: Any = field(default=None, repr=False, compare=False)
    base_model_name_or_path: Any = field(default=None, repr=False, compare=False)
    revision: Any = field(default=None, repr=False, compare=False)
    inference_mode: Any = field(default=False, repr=False, compare=False)
    fan_in_fan_out: Any = field(default=False, repr=False, compare=False)
    megatron_core: Any = field(default="megatron.core", repr=False, compare=False)
    qalora_group_size: Any = field(default=16, repr=False, compare=False)
    loftq_config: Any = field(default=None, repr=False, compare=False)
    eva_config: Any = field(default=None, repr=False, compare=False)
    corda_config: Any = field(default=None, repr=False, compare=False)
    lora_ga_config: Any = field(default=None, repr=False, compare=False)
    runtime_config: Any = field(default=None, repr=False, compare=False)
    trainable_token_indices: Any = field(default=None, repr=False, compare=False)
    layer_replication: Any = field(default=None, repr=False, compare=False)
    megatron_config: Any = field(default=None, repr=False, compare=False)
    use_qalora: Any = field(default=False, repr=False, compare=False)
    use_bdlora: Any = field(default=None, repr=False, compare=False)
    velora_config: Any = field(default=None, repr=False, compare=False)
    alora_invocation_tokens: Any = field(default=None, repr=False, compare=False)
    monteclora_config: Any = field(default=None, repr=False, compare=False)
    arrow_config: Any = field(default=None, repr=False, compare=False)
    kasa_config: Any = field(default=None, repr=False, compare=False)
    ensure_weight_tying: Any = field(default=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_peft_fields({name: getattr(self, name) for name in PEFT_ONLY_FIELDS})
        if not is_positive_int(self.r):
            raise ValueError(f"r must be an integer >= 1, got {self.r!r}")
        if not isinstance(self.lora_alpha, (int, float)) or not math.isfinite(self.lora_alpha):
            raise ValueError(f"lora_alpha must be a finite number, got {self.lora_alpha!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        self.task_type = check_task_type(self.task_type)
        self.modules_to_save = with_task_heads(self.modules_to_save, self.task_type)
        self.target_parameters = _check_target_parameters(self.target_parameters)
        check_shared_fields(self, targets_optional=self.target_parameters is not None)
        self.init_lora_weights = _check_init(self.init_lora_weights)
        _check_lora_bias(self)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                "layers_to_transform cannot be used when target_modules is a str (a regex or "
                "'all-linear'), as in peft: put the layer index in the regex, or list the names"
            )
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError(
                "layers_pattern cannot be used when target_modules is a str, as in peft"
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform, as in peft")
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

        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """The (r, α) for ``module_name`` after ``rank_pattern`` / ``alpha_pattern``."""
        return (
            _pattern_value(self.rank_pattern, module_name, self.r),
            _pattern_value(self.alpha_pattern, module_name, self.lora_alpha),
        )

    def scaling_for(self, rank: int, alpha: float) -> float:
        return lora_scaling(rank, alpha, self.use_rslora)

    def to_dict(self) -> dict[str, Any]:
        """The fields that define the adapters (peft's inert fields left out)."""
        return {k: v for k, v in asdict(self).items() if k not in PEFT_ONLY_FIELDS}


PEFT_ONLY_FIELDS = (*PEFT_IGNORED_FIELDS, *PEFT_UNSUPPORTED_FIELDS)


def _check_peft_fields(values: dict[str, Any]) -> None:
    check_peft_type(values["peft_type"], "LORA", "a LoRAConfig")
    for name, default in PEFT_UNSUPPORTED_FIELDS.items():
        value = values[name]
        if value != default and value not in ([], {}, ()):
            raise ValueError(
                f"{name}={value!r} is not supported here (it would change the adapted model); "
                f"leave it at peft's default {default!r}"
            )


def _check_target_parameters(value: Any) -> list[str] | None:
    """None, or a non-empty list/tuple/set of parameter names, as a sorted list."""
    if value is None or (isinstance(value, (list, tuple, set, frozenset)) and not value):
        return None
    if isinstance(value, (list, tuple, set, frozenset)) and all(
        isinstance(v, str) and v for v in value
    ):
        return sorted(set(value))
    raise ValueError(
        "target_parameters must be a list of parameter names (e.g. ['gate_up_proj', "
        f"'down_proj']), got {value!r}"
    )


def _check_lora_bias(config: LoRAConfig) -> None:
    """peft's rules for ``lora_bias`` (``LoraConfig.__post_init__``)."""
    if not isinstance(config.lora_bias, bool):
        raise ValueError(f"lora_bias must be True or False, got {config.lora_bias!r}")
    if not config.lora_bias:
        return
    if config.init_lora_weights not in (True, False):
        raise ValueError(
            "lora_bias=True is only supported with init_lora_weights=True or False (as in "
            f"peft), got init_lora_weights={config.init_lora_weights!r}"
        )
    if config.use_dora:
        raise ValueError("lora_bias=True is not supported with DoRA (as in peft): use_dora=False")


def _check_init(init: Any) -> bool | str:
    if isinstance(init, bool) or init in INIT_CHOICES:
        return init
    if isinstance(init, str):
        for name, why in PEFT_INITS_NOT_HERE.items():
            if init == name or (name.endswith("_") and init.startswith(name)):
                raise ValueError(
                    f"init_lora_weights={init!r} is not available here (peft's {init!r} {why}); "
                    f"init_lora_weights must be one of {INIT_CHOICES}"
                )
    raise ValueError(f"init_lora_weights must be one of {INIT_CHOICES}, got {init!r}")


def _pattern_value(patterns: dict, module_name: str, default):
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return value
    return default
