"""``inject_adapters``: put adapters into any ``nn.Module`` in place and freeze the rest.

Written against the method registry and the ``AdapterLayer`` protocol (``lightning_peft.methods``):
nothing here knows LoRA from a bottleneck adapter.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from lightning_peft.core.adapter import AdapterLayer
from lightning_peft.core.bnb import keep_standard_layout, parameter_count
from lightning_peft.core.distributed import clean_name
from lightning_peft.methods.registry import adapter_layers, method_for
from lightning_peft.model.sites import (
    DEFAULT_NAME,
    add_nested,
    check_adapter_name,
    check_beside,
    one_adapter_refusal,
    refresh_routes,
    site_path_of,
)
from lightning_peft.model.targeting import TargetPlan, base_module_at, plan_targets

STATE_ATTR = "lightning_peft_state"


@dataclass
class InjectionState:
    """One named adapter: what was injected, for saving and unloading."""

    config: object
    targets: list[str]
    modules_to_save: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    name: str = DEFAULT_NAME


@dataclass
class AdapterSet:
    """Kept on the injected root module (``STATE_ATTR``): every named adapter's state in
    injection order, and the active names (``set_active_adapters``; several sum)."""

    states: dict[str, InjectionState]
    active: list[str]

    @property
    def primary(self) -> InjectionState:
        """The first active adapter's state (the adapter, when there is one)."""
        return self.states[self.active[0]] if self.active else next(iter(self.states.values()))


@dataclass
class AdaptedModule:
    name: str
    kind: str
    shape: str
    rank: int
    params: int


@dataclass
class InjectionReport:
    """What ``inject_adapters`` did; ``str(report)`` is a table."""

    method: str
    modules: list[AdaptedModule] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / max(self.total_params, 1)

    def table(self) -> str:
        rows = [("", "Name", "Kind", "Shape", "Rank", "Params")]
        rows += [
            (str(i), m.name, m.kind, m.shape, str(m.rank), f"{m.params:,}")
            for i, m in enumerate(self.modules)
        ]
        rows += [("", name, "trained in full", "", "", "") for name in self.modules_to_save]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows
        ]
        lines.insert(1, "-" * len(lines[0]))
        lines += [
            "-" * len(lines[0]),
            f"{self.trainable_params:,} trainable params of {self.total_params:,} "
            f"({100 * self.trainable_fraction:.3f}%) in {len(self.modules)} adapted "
            f"module{'s' * (len(self.modules) != 1)}",
        ]
        lines += [f"skipped {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)

    __str__ = table


def find_adapters(model: nn.Module) -> tuple[str, nn.Module, AdapterSet] | None:
    """``(prefix, root, adapter set)`` of the injected root at or below ``model``, or None."""
    for prefix, module in model.named_modules():
        adapters = getattr(module, STATE_ATTR, None)
        if isinstance(adapters, AdapterSet):
            return prefix, module, adapters
    return None


def find_injection(model: nn.Module) -> tuple[str, nn.Module, InjectionState] | None:
    """``(prefix, root, state)`` of the injected root at or below ``model``, or None; with
    several named adapters, the state of the first active one."""
    found = find_adapters(model)
    return None if found is None else (found[0], found[1], found[2].primary)


def modules_to_save_names(model: nn.Module, config) -> list[str]:
    """Modules trained in full, at every place they appear. peft's rule: the name ends with an
    entry (no dot needed)."""
    if not getattr(config, "modules_to_save", None):
        return []
    names = [
        n
        for n, _ in model.named_modules(remove_duplicate=False)
        if n and any(n.endswith(m) for m in config.modules_to_save)
    ]
    if not names:
        raise ValueError(f"no module matched modules_to_save={config.modules_to_save!r}")
    return names


@dataclass
class InjectionPlan:
    """Everything ``inject_adapters`` will do, checked before the model is touched."""

    targets: TargetPlan
    modules_to_save: list[str]
    aliases: dict[str, list[str]]  # target -> every path of the target module in the model


def plan_injection(model: nn.Module, config, name: str = DEFAULT_NAME) -> InjectionPlan:
    """Select the targets and run every check that could fail, without changing ``model``.

    Raises:
        TypeError: ``config`` is not a registered method's config.
        ValueError: naming the problem (see ``plan_targets``, the layer classes' ``check``,
            ``check_beside`` for a model that has adapters already).
    """
    method = method_for(config)
    check_adapter_name(name, method.layers)
    found = find_adapters(model)
    existing = [layer for _, layer in adapter_layers(model)]
    if existing:
        check_beside(model, found, config, name)
    targets = plan_targets(model, config)
    save_names = modules_to_save_names(model, config)
    paths: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(path)
    aliases = {}
    for target, layer_class in targets.targets:
        module = base_module_at(model, target)
        if existing:
            if not layer_class.supports_named:
                raise ValueError(one_adapter_refusal(layer_class.__name__, target))
            refusal = layer_class.named_refusal(config, name)
            if refusal is not None:
                raise ValueError(refusal)
        aliases[target] = paths[id(model.get_submodule(target))]
        layer_class.placement.check(model, target, aliases[target])
        layer_class.check(module, config, target)
    adapted = [path for name in targets.names for path in aliases[name]]
    state = InjectionState(config, targets.names, save_names)
    for name, param in _base_parameters(model, state, adapted):
        if not param.is_floating_point():  # e.g. a bitsandbytes layer's packed weight
            saved = getattr(config, "modules_to_save", None)
            raise ValueError(
                f"{name!r} would train in full (modules_to_save={saved!r}, "
                f"bias={getattr(config, 'bias', 'none')!r}) but it is a {param.dtype} tensor "
                "(quantized), which cannot train: keep its module float, or leave it out"
            )
    return InjectionPlan(targets, save_names, aliases)


def adapter_parameters(
    root: nn.Module, state: InjectionState
) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of everything that trains and is saved: the adapter layers'
    parameters (of the adapter ``state.name``), ``modules_to_save``, and the biases
    ``config.bias`` chooses. A tensor the model
    holds in several places (a shared module, tied weights) comes once, under the first name
    that qualifies (peft saves a shared module once, too). The one source of the trainable set,
    ``adapter_state_dict`` and the saved file."""
    modules = dict(root.named_modules(remove_duplicate=False))
    adapter_names: set[str] = set()
    adapted: list[str] = []  # target paths, as root names them
    for path, module in modules.items():
        if isinstance(module, AdapterLayer) and module.adapter_name == state.name:
            adapter_names.update(f"{path}.{n}" for n in module.adapter_parameter_names())
            adapted.append(type(module).placement.target_path(path))
    saved = [clean_name(n) for n in state.modules_to_save]
    seen: set[int] = set()
    for name, param in root.named_parameters(remove_duplicate=False):
        clean = clean_name(name)
        if id(param) not in seen and (
            name in adapter_names
            or any(clean == m or clean.startswith(f"{m}.") for m in saved)
            or _trained_bias(name, getattr(state.config, "bias", "none"), adapted)
        ):
            seen.add(id(param))
            yield name, param


def _trained_bias(name: str, bias: str, adapted: list[str]) -> bool:
    """peft's rules: ``"all"`` trains every parameter with "bias" in its name; ``"lora_only"``
    the ``bias`` of each adapted module (every ``bias`` inside it, for a hooked adapter)."""
    if bias == "all":
        return "bias" in name
    if bias == "lora_only":
        return name.rpartition(".")[2] == "bias" and any(name.startswith(f"{t}.") for t in adapted)
    return False


def mark_trainable(model: nn.Module, *states: InjectionState) -> None:
    """Freeze everything, then unfreeze what ``adapter_parameters`` names for each state."""
    model.requires_grad_(False)
    for state in states:
        for _, param in adapter_parameters(model, state):
            param.requires_grad_(True)


def mark_active_trainable(root: nn.Module, adapters: AdapterSet) -> None:
    """Only the active adapters train (peft's ``set_adapter``); each site routes its forward
    for its active adapters."""
    mark_trainable(root, *(adapters.states[name] for name in adapters.active))
    refresh_routes(root, adapters.active)


def inject_adapters(model: nn.Module, config, name: str = DEFAULT_NAME) -> InjectionReport:
    """Adapt the target modules of ``model`` in place and freeze everything else.

    LoRA/DoRA: each target ``nn.Linear``/``Conv1D`` becomes a ``LoRALinear``, each
    ``nn.Conv1d/2d/3d`` a ``LoRAConv``, each ``nn.Embedding`` a ``LoRAEmbedding``, sharing its
    parameters. Adapters: each target gets a ``BottleneckAdapter`` on its output. What stays
    trainable: the adapters, ``modules_to_save``, and biases as ``config.bias`` says.

    ``name`` names the adapter (``"default"`` unless given). A model that has adapters already
    gets this one beside them (``docs/named-adapters.md``): a target already adapted keeps its
    layer and holds the new one in its ``named_adapters``; the active adapters stay as they
    were (peft's ``add_adapter``), so the new one is frozen until ``set_active_adapters``.

    Raises:
        TypeError: ``config`` is not a registered method's config.
        ValueError: no module matched (naming close matches), a target of the wrong type, an
            invalid name or one the model has already, an adapter that cannot sit beside the
            ones there (``check_beside``). The model is unchanged then.
    """
    plan = plan_injection(model, config, name)
    found = find_adapters(model)
    keep_standard_layout(model)  # bitsandbytes layers: no CPU repacking that drops gradients
    for target, layer_class in plan.targets.targets:  # nothing can fail below this line
        site = model.get_submodule(target)
        if isinstance(site, AdapterLayer) and not site.nested and type(site).supports_named:
            add_nested(site, name, layer_class.build(site.base_layer, config, target))
            continue
        layer = layer_class.build(site, config, target)
        layer.adapter_name = name
        layer_class.placement.attach(model, target, layer)
    state = InjectionState(
        config=config,
        targets=plan.targets.names,
        modules_to_save=plan.modules_to_save,
        skipped=plan.targets.skipped,
        name=name,
    )
    if found is None:
        root, adapters = model, AdapterSet({name: state}, [name])
        setattr(model, STATE_ATTR, adapters)
        mark_trainable(model, state)
    else:
        from lightning_peft.model.mixed import accept_adapter_names  # it imports this module

        root, adapters = found[1], found[2]
        adapters.states[name] = state
        mark_active_trainable(root, adapters)
        accept_adapter_names(root)  # model(..., adapter_names=[...]) as in peft
    return injection_report(model)


def injection_report(model: nn.Module, name: str | None = None) -> InjectionReport:
    """The report of the adapter ``name`` (by default the first active one): its layers, and
    the model's trainable and total parameter counts."""
    found = find_adapters(model)
    if found is None:
        raise ValueError("the model has no adapters (inject_adapters was not called on it)")
    _, root, adapters = found
    state = adapters.primary if name is None else adapters.states[name]
    report = InjectionReport(
        method=method_for(state.config).name,
        modules_to_save=list(state.modules_to_save),
        skipped=list(state.skipped),
    )
    for path, layer in root.named_modules():
        if isinstance(layer, AdapterLayer) and layer.adapter_name == state.name:
            kind, shape, rank = layer.describe()
            params = sum(layer.get_parameter(n).numel() for n in layer.adapter_parameter_names())
            target = clean_name(type(layer).placement.target_path(site_path_of(path)))
            report.modules.append(AdaptedModule(target, kind, shape, rank, params))
    params = list({id(p): p for p in model.parameters()}.values())
    report.trainable_params = sum(parameter_count(p) for p in params if p.requires_grad)
    report.total_params = sum(parameter_count(p) for p in params)  # packed 4-bit: 2 per byte
    return report


def planned_tensors(
    model: nn.Module, config, name: str = DEFAULT_NAME
) -> dict[str, tuple[int, ...]]:
    """``{PEFT key: shape}`` of what ``save_adapter`` writes after ``inject_adapters(model,
    config, name)``, from the layer classes' declarations (``adapter_shapes``, ``peft_key``, the
    placement), computed on the model before injection. Raises as ``plan_injection``."""
    plan = plan_injection(model, config, name)
    prefix = method_for(config).file_prefix
    shapes: dict[str, tuple[int, ...]] = {}
    replaced: dict[str, type[AdapterLayer]] = {}  # targets whose layer takes their place
    for name, layer_class in plan.targets.targets:
        layer_path = layer_class.placement.layer_path(name)
        if layer_path == name:
            replaced[name] = layer_class
        module = base_module_at(model, name)
        for local, shape in layer_class.adapter_shapes(module, config, name).items():
            shapes[layer_class.peft_key(layer_path, local)] = shape
    adapted = [p for name in plan.targets.names for p in plan.aliases[name]]
    state = InjectionState(config, plan.targets.names, plan.modules_to_save)
    for name, param in _base_parameters(model, state, adapted):
        owner, _, local = name.rpartition(".")
        if owner in replaced:  # the layer will hold the base's tensor under the same local name
            shapes[replaced[owner].peft_key(owner, local)] = tuple(param.shape)
        else:
            shapes[prefix + name] = tuple(param.shape)
    return shapes


def _base_parameters(model: nn.Module, state: InjectionState, adapted: list[str]):
    """``adapter_parameters``' rule for the base model's own tensors, before injection."""
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) not in seen and (
            any(name == m or name.startswith(f"{m}.") for m in state.modules_to_save)
            or _trained_bias(name, getattr(state.config, "bias", "none"), adapted)
        ):
            seen.add(id(param))
            yield name, param
