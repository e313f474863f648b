"""Which modules a config adapts, by `peft`'s rules (``peft.tuners.tuners_utils``).

- a list of names matches a module's whole name or a ``.name`` suffix; a string is a
  full-match regex; ``"all-linear"`` is every ``nn.Linear``/``Conv1D`` except a transformers
  model's output layer (``get_output_embeddings()``);
- ``exclude_modules`` (same rules) and anything inside ``modules_to_save`` are never targets;
- ``layers_to_transform`` keeps modules whose first ``<name>.<index>.`` (or
  ``<layers_pattern>.<index>.``) index is listed.
"""

from __future__ import annotations

import re

from torch import nn

from lightning_peft.config import ALL_LINEAR, AdapterConfig, LoRAConfig
from lightning_peft.lora_layer import is_linear_like


def name_matches(targets: list[str] | str | None, name: str) -> bool:
    """peft's rule: a regex string must match the whole name; a list entry the name or a suffix."""
    if not targets:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith(f".{target}") for target in targets)


def inside_modules_to_save(modules_to_save: list[str] | None, name: str) -> bool:
    return bool(modules_to_save) and any(
        re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in modules_to_save
    )


def layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    """The first layer index in ``name`` (``...layers.3.self_attn...`` -> 3), as peft reads it."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", name)
            if match:
                break
    return int(match.group(1)) if match else None


def output_layer_name(model: nn.Module) -> str | None:
    """The name of a transformers model's output layer (e.g. ``lm_head``), if it has one."""
    get_output = getattr(model, "get_output_embeddings", None)
    if not callable(get_output):
        return None
    try:
        output = get_output()
    except (NotImplementedError, AttributeError):
        return None
    return next((n for n, m in model.named_modules() if m is output), None) if output else None


def select_targets(model: nn.Module, config: LoRAConfig | AdapterConfig) -> list[str]:
    """Names of the modules ``config`` adapts, in ``model.named_modules()`` order.

    Raises:
        ValueError: no module matched (listing a sample of the model's module names), or a
            LoRA target is not an ``nn.Linear``/``Conv1D``.
    """
    modules = [(n, m) for n, m in model.named_modules() if n]
    if config.target_modules == ALL_LINEAR:
        output = output_layer_name(model)
        matched = [n for n, m in modules if is_linear_like(m) and n != output]
    else:
        matched = [n for n, _ in modules if name_matches(config.target_modules, n)]
    matched = [
        n
        for n in matched
        if not name_matches(config.exclude_modules, n)
        and not inside_modules_to_save(config.modules_to_save, n)
    ]
    layers = getattr(config, "layers_to_transform", None)
    if layers is not None:
        wanted = {layers} if isinstance(layers, int) else set(layers)
        matched = [n for n in matched if layer_index(n, config.layers_pattern) in wanted]
    if not matched:
        sample = ", ".join(n for n, _ in modules[:12])
        raise ValueError(
            f"no module matched target_modules={config.target_modules!r}"
            + (f" with layers_to_transform={layers!r}" if layers is not None else "")
            + f"; the model's modules include: {sample}"
            + (", ..." if len(modules) > 12 else "")
        )
    if isinstance(config, LoRAConfig):
        by_name = dict(modules)
        for name in matched:
            if not is_linear_like(by_name[name]):
                raise ValueError(
                    f"target {name!r} is a {type(by_name[name]).__name__}; LoRA adapts nn.Linear "
                    "and Conv1D only: narrow target_modules"
                )
    return matched
