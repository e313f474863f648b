"""Which modules a config adapts, by `peft`'s rules (``peft.tuners.tuners_utils``).

- a list of names matches a module's whole name or a ``.name`` suffix; a string is a
  full-match regex; ``"all-linear"`` is every ``nn.Linear``/``Conv1D`` except a transformers
  model's output layer (``get_output_embeddings()``);
- ``exclude_modules`` (same rules) and anything inside ``modules_to_save`` are never targets;
- ``layers_to_transform`` keeps modules whose first ``<name>.<index>.`` (or
  ``<layers_pattern>.<index>.``) index is listed; a module listed by its full name in
  ``target_modules`` is kept whatever its index (peft's ``check_target_module_exists`` returns on
  the full-name match before the layer filter);
- each target goes to the first layer class of the config's method that adapts it; a target no
  class adapts is refused by name, and so is a module whose parent never calls it (the
  ``out_proj`` of ``nn.MultiheadAttention``, which LoRA adapts through the attention module
  itself): ``all-linear`` skips those, saying why.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from torch import nn

from lightning_peft.core.adapter import AdapterLayer, is_linear_like
from lightning_peft.core.config import ALL_LINEAR
from lightning_peft.core.matching import (
    inside_modules_to_save,
    layer_index,
    name_matches,
    named_in_full,
)
from lightning_peft.methods.registry import adapter_layers, method_for


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


def never_called_reason(model: nn.Module, name: str) -> str | None:
    """Why the module ``name`` is never called by its parent's forward, or None.

    ``nn.MultiheadAttention`` reads ``out_proj.weight`` and ``.bias`` directly (and keeps its
    input projections as plain parameters): an adapter on ``out_proj`` would never act.
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if isinstance(parent, nn.MultiheadAttention):
        return (
            f"the {child} of nn.MultiheadAttention {parent_name or '(the model)'!r}, whose forward "
            f"reads {child}.weight directly and never calls the module: an adapter there would "
            "never act (target the nn.MultiheadAttention itself: LoRA adapts its in_proj and "
            "out_proj)"
        )
    return None


@dataclass
class TargetPlan:
    """What a config adapts in a model: each target with its layer class, and the modules
    ``all-linear`` skipped with the reason."""

    targets: list[tuple[str, type[AdapterLayer]]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.targets]


def refuse_existing_adapters(model: nn.Module) -> None:
    """Raise if ``model`` already holds adapter layers, saying how to remove them."""
    for path, layer in adapter_layers(model):
        raise ValueError(
            f"the model already has adapters (a {type(layer).__name__} at {path!r}); remove them "
            "first with unload(model), which merges mergeable ones into the weights, or "
            "unload(model, merge=False), which drops them; then inject again"
        )


def base_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model.named_modules()`` as the base model has them: an adapter layer that took a
    module's place stands for that module (its base layer and the base's own children), what
    adapters added (nested named adapters, hooked children) is left out. Without adapters, the
    model's own modules."""
    out: list[tuple[str, nn.Module]] = []
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in skip):
            continue
        if isinstance(module, AdapterLayer):
            skip.append(f"{name}.")
            if type(module).placement.layer_path(name) != name:  # a hooked child: not the base
                continue
            base = module.base_layer
            out += [(".".join(filter(None, (name, n))), m) for n, m in base.named_modules()]
            continue
        out.append((name, module))
    return out


def base_module_at(model: nn.Module, name: str) -> nn.Module:
    """The base model's module at ``name`` (an adapter layer's base layer where one took its
    place)."""
    module = model.get_submodule(name)
    return module.base_layer if isinstance(module, AdapterLayer) else module


def plan_targets(model: nn.Module, config) -> TargetPlan:
    """Each module ``config`` adapts, in ``model.named_modules()`` order, with its layer class;
    in a model that has adapters, the base model's modules (``base_modules``).

    Raises:
        TypeError: ``config`` is not a registered method's config.
        ValueError: no module matched (naming close matches among the model's module names); a
            target that no layer class of the method adapts or that its parent never calls.
    """
    method = method_for(config)
    modules = [(n, m) for n, m in base_modules(model) if n]
    all_linear = getattr(config, "target_modules", None) == ALL_LINEAR
    if method.select is not None:
        matched = method.select(model, config)
    elif all_linear:
        output = output_layer_name(model)
        matched = [n for n, m in modules if is_linear_like(m) and n != output]
    else:
        matched = [n for n, _ in modules if name_matches(config.target_modules, n)]
    kept = [
        n
        for n in matched
        if not name_matches(getattr(config, "exclude_modules", None), n)
        and not inside_modules_to_save(getattr(config, "modules_to_save", None), n)
    ]
    layers = getattr(config, "layers_to_transform", None)
    if layers is not None:
        wanted = {layers} if isinstance(layers, int) else set(layers)
        kept = [
            n
            for n in kept
            if named_in_full(config.target_modules, n)
            or layer_index(n, config.layers_pattern) in wanted
        ]
    if not kept:
        raise ValueError(_no_match_message(config, [n for n, _ in modules], matched))
    plan = TargetPlan()
    by_name = dict(modules)
    for name in kept:
        reason = never_called_reason(model, name)
        if reason is not None:
            if not all_linear:
                raise ValueError(f"target {name!r} is {reason}: narrow target_modules")
            plan.skipped.append((name, reason))
            continue
        layer_class = method.layer_class(by_name[name])
        if layer_class is None:
            raise ValueError(method.refusal(by_name[name], name))
        plan.targets.append((name, layer_class))
    if not plan.targets:
        raise ValueError(
            "all-linear matched only modules that cannot be adapted: "
            + "; ".join(f"{name!r} is {reason}" for name, reason in plan.skipped)
        )
    return plan


def select_targets(model: nn.Module, config) -> list[str]:
    """Names of the modules ``config`` adapts, in ``model.named_modules()`` order.

    Raises:
        ValueError: as ``plan_targets``; the message of "no module matched" names the targets
            and lists close matches among the model's module names.
    """
    return plan_targets(model, config).names


def _no_match_message(config, names: list[str], matched: list[str]) -> str:
    targets = config.target_modules
    message = f"no module matched target_modules={targets!r}"
    layers = getattr(config, "layers_to_transform", None)
    if matched:  # something matched the names, then was filtered out
        filters = [
            f"{name}={getattr(config, name)!r}"
            for name in ("exclude_modules", "modules_to_save")
            if getattr(config, name, None)
        ]
        if layers is not None:
            indices = sorted(
                {i for n in matched if (i := layer_index(n, config.layers_pattern)) is not None}
            )
            filters.append(
                f"layers_to_transform={layers!r} (the matches' layer indices: {indices or 'none'})"
            )
        return (
            f"{message} after filtering: {len(matched)} module(s) matched the names (e.g. "
            f"{matched[0]!r}) but {', '.join(filters)} removed them all"
        )
    leaves = list(dict.fromkeys(n.rpartition(".")[2] for n in names if not n[-1:].isdigit()))
    wanted = [targets] if isinstance(targets, str) else list(targets or [])
    hints = []
    for target in (t for t in wanted if t not in leaves):
        close = difflib.get_close_matches(target, leaves, n=3, cutoff=0.6)
        close = close or difflib.get_close_matches(target, names, n=3, cutoff=0.6)
        if close:
            hints.append(f"{target!r} -> {', '.join(repr(c) for c in close)}")
    if hints:
        message += "; close matches: " + "; ".join(hints)
    if isinstance(targets, str) and targets != ALL_LINEAR:
        exact = [n for n in names if n.rpartition(".")[2] == targets]
        message += ". A string is a regex that must match a module's whole name"
        if exact:
            message += f" (e.g. {exact[0]!r}); pass a list, [{targets!r}], to match by name"
    shown = ", ".join(leaves[:24]) + (", ..." if len(leaves) > 24 else "")
    return f"{message}. The model's module names end in: {shown}"
