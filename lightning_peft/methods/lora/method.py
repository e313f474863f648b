"""LoRA as a registered method: its layer types in dispatch order and its ``adapter_config.json``
(peft's ``LoraConfig`` fields), written and read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lightning_peft.core.adapter import (
    Method,
    base_model_name,
    config_from_file,
)
from lightning_peft.methods.lora.cli import COMMAND_LINE
from lightning_peft.methods.lora.config import (
    INIT_CHOICES,
    PEFT_INITS_NOT_HERE,
    LoRAConfig,
)
from lightning_peft.methods.lora.conv import LoRAConv
from lightning_peft.methods.lora.embedding import LoRAEmbedding
from lightning_peft.methods.lora.linear import LoRALinear
from lightning_peft.methods.lora.mha import LoRAMultiheadAttention
from lightning_peft.methods.lora.param_layer import ParameterLoRA
from lightning_peft.methods.lora.param_targets import convert_for_transformers, parameter_targets
from lightning_peft.methods.lora.quantized import QuantizedLoRALinear

_PEFT_LORA_FIELDS = (
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "bias",
    "use_rslora",
    "use_dora",
    "init_lora_weights",
    "lora_bias",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "task_type",
    "target_parameters",
)


# Inits that only set the starting A and B (the file then replaces them) and leave W alone:
# peft's load equals a plain LoRA load.
LOADS_AS_DEFAULT = ("eva", "orthogonal")


def write_lora_config(model: nn.Module, config: LoRAConfig, targets: list[str]) -> dict:
    """peft's ``adapter_config.json`` for ``config`` (as applied to ``model``), listing the exact
    modules and parameters adapted."""
    data: dict[str, Any] = {name: getattr(config, name) for name in _PEFT_LORA_FIELDS}
    layers = {name: model.get_submodule(name) for name in targets}
    parameters = [
        f"{name}.{local}"
        for name, layer in layers.items()
        if isinstance(layer, ParameterLoRA)
        for local in layer.param_names
    ]
    targets = [name for name, layer in layers.items() if not isinstance(layer, ParameterLoRA)]
    data.update(
        target_parameters=parameters or None,
        peft_type="LORA",
        inference_mode=True,
        base_model_name_or_path=base_model_name(model),
        # The exact modules adapted: peft matches a listed full name directly.
        target_modules=targets,
        layers_to_transform=None,
        layers_pattern=None,
        fan_in_fan_out=any(
            getattr(model.get_submodule(t), "fan_in_fan_out", False) for t in targets
        ),
    )
    return data


def read_lora_config(data: dict, path: Path) -> LoRAConfig:
    """A ``LoRAConfig`` from peft's ``adapter_config.json`` content, or a ``ValueError`` naming
    ``path`` and whatever cannot be loaded with peft's numbers."""
    data = {key: value for key, value in data.items() if value is not None}
    init = data.get("init_lora_weights", True)
    if init in LOADS_AS_DEFAULT:
        data["init_lora_weights"] = True
    elif not (isinstance(init, bool) or init in INIT_CHOICES):
        why = next(
            (
                why
                for name, why in PEFT_INITS_NOT_HERE.items()
                if init == name or (name.endswith("_") and str(init).startswith(name))
            ),
            "is not known here",
        )
        raise ValueError(
            f"{path}: init_lora_weights={init!r} {why}; loading this adapter here would not "
            "give peft's numbers, so it is refused"
        )
    return config_from_file(LoRAConfig, data, path)


LORA = Method(
    name="lora",
    peft_type="LORA",
    config_cls=LoRAConfig,
    layers=(QuantizedLoRALinear, LoRALinear, LoRAEmbedding, LoRAConv, LoRAMultiheadAttention),
    write_config=write_lora_config,
    read_config=read_lora_config,
    label="LoRA",
    command_line=COMMAND_LINE,
    prepare_config=convert_for_transformers,
    select_parameters=parameter_targets,
)
