"""Which parameters LoRA's ``target_parameters`` adapts, and peft 0.21.2's rewrite of a config for
transformers 5's mixture-of-experts models (``peft/utils/transformers_weight_conversion.py``).

Selection (peft's ``_inject_parameters``): every parameter ``<module>.<name>`` that an entry of
``target_parameters`` names whole or as a ``.<entry>`` suffix; ``exclude_modules`` and
``layers_to_transform`` do not apply to parameters (as in peft). The parameters of one module go
to one layer: ``LoRAExperts`` for the 3-D projections of a transformers experts module,
``LoRAParameter`` for 2-D parameters; anything else is refused by name.

The rewrite (peft's ``_convert_peft_config_moe``), for a model whose ``config.model_type``
transformers converts from the v4 layout into the ``mixtral`` or ``qwen2_moe`` pattern
(``transformers.conversion_mapping``; Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V2/V3, ...): the v4
names of the experts (``w1``/``w3``/``w2``, ``gate_proj``/``up_proj``/``down_proj``) and the
router (``gate``) in ``target_modules`` become ``target_parameters`` (``gate_up_proj``,
``down_proj``, ``gate.weight``); a string ``target_modules`` (a regex, or ``"all-linear"``) is
first resolved to leaf names (``"all-linear"``: the linear layers' leaf names plus all the v4
names, since the experts and the router were linear layers in v4). When both halves of a fused
weight are named (``w1`` and ``w3``), ``rank_pattern`` and ``alpha_pattern`` give
``gate_up_proj`` ``2·r`` and ``2·α``: a v4 adapter's two rank-r pairs stacked block-diagonally
are one rank-2r pair of the fused weight, at the same ``α/r`` scale. Naming one half only is
refused, as peft refuses it.
"""

from __future__ import annotations

import dataclasses
import re

from torch import nn

from lightning_peft.core.adapter import AdapterLayer, is_linear_like
from lightning_peft.core.config import ALL_LINEAR
from lightning_peft.core.matching import name_matches
from lightning_peft.methods.lora.config import LoRAConfig
from lightning_peft.methods.lora.experts import LoRAExperts, experts_refusal, is_experts_module
from lightning_peft.methods.lora.param_layer import (
    LoRAParameter,
    check_parameter_shapes,
    targeted_parameters,
)

# peft 0.21.2's tables (``_MOE_TARGET_MODULE_MAPPING``, ``_MOE_FUSED_TARGETS``): v4 name -> v5.
MOE_TARGET_MAPPING = {
    "mixtral": {
        "gate": "gate.weight",
        "w1": "gate_up_proj",
        "w3": "gate_up_proj",
        "w2": "down_proj",
    },
    "qwen2_moe": {
        "gate": "gate.weight",
        "gate_proj": "gate_up_proj",
        "up_proj": "gate_up_proj",
        "down_proj": "down_proj",
    },
}
MOE_FUSED_TARGETS = {
    "mixtral": {"gate_up_proj": ("w1", "w3")},
    "qwen2_moe": {"gate_up_proj": ("gate_proj", "up_proj")},
}


def transformers_config_owner(model: nn.Module) -> nn.Module | None:
    """The model itself or its first submodule with a transformers ``config.model_type``."""
    return next(
        (m for _, m in model.named_modules() if hasattr(getattr(m, "config", None), "model_type")),
        None,
    )


def moe_family(model: nn.Module) -> str | None:
    """``"mixtral"`` or ``"qwen2_moe"`` when peft 0.21.2 rewrites a config for this model's
    transformers-5 layout, else None (not a transformers model, or one it leaves alone)."""
    owner = transformers_config_owner(model)
    if owner is None:
        return None
    try:
        from transformers.conversion_mapping import (
            _MODEL_TO_CONVERSION_PATTERN,
            get_checkpoint_conversion_mapping,
        )
    except ImportError:  # transformers 4, or none: no v5 layout to convert to
        return None
    model_type = owner.config.model_type
    if get_checkpoint_conversion_mapping(model_type) is None:
        return None
    family = "mixtral" if model_type == "mixtral" else _MODEL_TO_CONVERSION_PATTERN.get(model_type)
    return family if family in MOE_TARGET_MAPPING else None


def _resolve_string_targets(model: nn.Module, config: LoRAConfig, mapping: dict) -> set[str]:
    """peft's ``_resolve_string_target_modules``: a string ``target_modules`` as leaf names."""
    targets = config.target_modules
    if targets.lower() == ALL_LINEAR:
        output = _output_layer(model)
        linear = {
            n.rpartition(".")[2]
            for n, m in model.named_modules()
            if is_linear_like(m) and m is not output
        }
        return linear | set(mapping)

    def selected(key: str) -> bool:
        return re.fullmatch(targets, key) is not None and not name_matches(
            config.exclude_modules, key
        )

    keys = [n for n, _ in model.named_modules()] + [n for n, _ in model.named_parameters()]
    matched = {key.rpartition(".")[2] for key in keys if selected(key)}
    containers: dict[str, set[str]] = {}
    for name, _ in model.named_parameters():
        container, _, leaf = name.rpartition(".")
        containers.setdefault(leaf, set()).add(container)
    for old_name, new_name in mapping.items():
        if old_name not in matched and any(
            selected(f"{c}.{old_name}") for c in containers.get(new_name, ())
        ):
            matched.add(old_name)
    return matched


def _output_layer(model: nn.Module) -> nn.Module | None:
    get_output = getattr(model, "get_output_embeddings", None)
    try:
        return get_output() if callable(get_output) else None
    except (NotImplementedError, AttributeError):
        return None


def convert_for_transformers(model: nn.Module, config: LoRAConfig) -> LoRAConfig:
    """The config peft 0.21.2 would use on ``model`` (a copy; ``config`` is left alone): for a
    transformers-5 mixture-of-experts model, the v4 expert and router names in
    ``target_modules`` become ``target_parameters`` (see the module docstring).

    Raises:
        ValueError: one half of a fused weight is named without the other (``w1`` without
            ``w3``), as peft refuses it.
    """
    family = moe_family(model)
    if family is None or config.target_modules is None:
        return config
    mapping, fused = MOE_TARGET_MAPPING[family], MOE_FUSED_TARGETS[family]
    targets = config.target_modules
    if isinstance(targets, str):
        targets = _resolve_string_targets(model, config, mapping)
        if not targets:
            return config  # nothing matched: the usual "no module matched" error follows
    parameters = set(config.target_parameters or [])
    remaining: set[str] = set()
    named: dict[str, set[str]] = {new: set() for new in fused}
    for target in targets:
        old = next((o for o in mapping if target == o or target.endswith(f".{o}")), None)
        if old is None:
            remaining.add(target)
            continue
        parameters.add(mapping[old])
        named.setdefault(mapping[old], set()).add(old)
    if not isinstance(config.target_modules, str) and parameters == set(
        config.target_parameters or []
    ):
        return config  # nothing to rewrite (a list that names no v4 expert or router)
    rank_pattern, alpha_pattern = dict(config.rank_pattern), dict(config.alpha_pattern)
    for new_name, required in fused.items():
        present = named.get(new_name, set())
        if 0 < len(present) < len(required):
            raise ValueError(
                f"target_modules names {', '.join(sorted(present))} but not "
                f"{', '.join(sorted(set(required) - present))}: on this transformers-5 model they "
                f"are fused into one {new_name} parameter per layer, so they can only be adapted "
                "together (peft refuses this too); name both, or neither"
            )
        if len(present) == len(required) > 1:
            key = rf".*\.{re.escape(new_name)}"
            rank_pattern[key] = config.r * len(required)
            alpha_pattern[key] = config.lora_alpha * len(required)
    return _replace(config, sorted(remaining), parameters, rank_pattern, alpha_pattern)


def _replace(config, modules, parameters, rank_pattern, alpha_pattern) -> LoRAConfig:
    return dataclasses.replace(
        config,
        target_modules=modules,
        target_parameters=sorted(parameters) or None,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )


def _refuse_parametrized(module: nn.Module, name: str, config: LoRAConfig) -> None:
    """Refuse a named parameter that ``torch.nn.utils.parametrize`` computes (bitsandbytes'
    ``replace_parameter_4bit`` quantizes experts that way): its stored tensor is not the weight,
    so it cannot be adapted or merged (peft 0.21.2 skips such parameters in silence)."""
    wanted = config.target_parameters or []
    for local, chain in getattr(module, "parametrizations", {}).items():
        key = f"{name}.{local}" if name else local
        if key in wanted or any(key.endswith(f".{entry}") for entry in wanted):
            kinds = ", ".join(type(p).__name__ for p in chain)
            raise ValueError(
                f"target_parameters names {key!r}, which a parametrization computes ({kinds}: "
                "e.g. bitsandbytes' replace_parameter_4bit quantizing the experts); LoRA cannot "
                "adapt a parametrized parameter. Load the experts unquantized (transformers' "
                "BitsAndBytesConfig quantizes the nn.Linear layers only and leaves them float)"
            )


def parameter_targets(model: nn.Module, config: LoRAConfig) -> list[tuple[str, type[AdapterLayer]]]:
    """``(module name, layer class)`` for each module holding parameters that
    ``config.target_parameters`` names, in ``model.named_modules()`` order.

    Raises:
        ValueError: a named parameter on the model itself (peft refuses it), of another rank
            than 2 or 3, a 3-D one outside a transformers experts module, or none matched.
    """
    if not getattr(config, "target_parameters", None):
        return []
    found = []
    for name, module in model.named_modules():
        _refuse_parametrized(module, name, config)
        params = targeted_parameters(module, name, config)
        if not params:
            continue
        if not name:
            raise ValueError(
                f"target_parameters names {params[0]!r}, a parameter of the model itself; "
                "peft cannot adapt a parameter of the top-level module either"
            )
        if is_experts_module(module) or any(module._parameters[p].dim() == 3 for p in params):
            reason = experts_refusal(module, name, params)
            if reason is not None:
                raise ValueError(reason)
            check_parameter_shapes(module, name, params, 3)
            found.append((name, LoRAExperts))
        else:
            check_parameter_shapes(module, name, params, 2)
            found.append((name, LoRAParameter))
    if not found:
        raise ValueError(
            f"no parameter matched target_parameters={config.target_parameters!r} (an entry "
            "names a parameter whole, e.g. 'model.layers.0.mlp.experts.gate_up_proj', or by its "
            "ending, e.g. 'gate_up_proj' or 'gate.weight')"
        )
    return found
