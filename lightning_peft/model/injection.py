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
from lightning_peft.methods.registry import method_for
from lightning_peft.model.targeting import TargetPlan, plan_targets

STATE_ATTR = "lightning_peft_state"


@dataclass
class InjectionState:
    """Kept on the injected root module: what was injected, for saving and unloading."""

    config: object
    targets: list[str]
    modules_to_save: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)


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


def find_injection(model: nn.Module) -> tuple[str, nn.Module, InjectionState] | None:
    """``(prefix, root, state)`` of the injected root at or below ``model``, or None."""
    for prefix, module in model.named_modules():
        state = getattr(module, STATE_ATTR, None)
        if isinstance(state, InjectionState):
            return prefix, module, state
    return None


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


def plan_injection(model: nn.Module, config) -> InjectionPlan:
    """Select the targets and run every check that could fail, without changing ``model``.

    Raises:
        TypeError: ``config`` is not a registered method's config.
        ValueError: naming the problem (see ``plan_targets``, the layer classes' ``check``).
    """
    targets = plan_targets(model, config)  # refuses a model that already has adapters
    config = targets.config  # as the method applies it to this model
    save_names = modules_to_save_names(model, config)
    paths: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(path)
    aliases = {}
    for name, layer_class in targets.targets:
        module = model.get_submodule(name)
        aliases[name] = paths[id(module)]
        layer_class.placement.check(model, name, aliases[name])
        layer_class.check(module, config, name)
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
    parameters, ``modules_to_save``, and the biases ``config.bias`` chooses. A tensor the model
    holds in several places (a shared module, tied weights) comes once, under the first name
    that qualifies (peft saves a shared module once, too). The one source of the trainable set,
    ``adapter_state_dict`` and the saved file."""
    modules = dict(root.named_modules(remove_duplicate=False))
    adapter_names: set[str] = set()
    adapted: list[str] = []  # target paths, as root names them
    for path, module in modules.items():
        if isinstance(module, AdapterLayer):
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


def mark_trainable(model: nn.Module, state: InjectionState) -> None:
    """Freeze everything, then unfreeze what ``adapter_parameters`` names."""
    model.requires_grad_(False)
    for _, param in adapter_parameters(model, state):
        param.requires_grad_(True)


def inject_adapters(model: nn.Module, config) -> InjectionReport:
    """Adapt the target modules of ``model`` in place and freeze everything else.

    LoRA/DoRA: each target ``nn.Linear``/``Conv1D`` becomes a ``LoRALinear``, each
    ``nn.Conv1d/2d/3d`` a ``LoRAConv``, each ``nn.Embedding`` a ``LoRAEmbedding``, sharing its
    parameters. Adapters: each target gets a ``BottleneckAdapter`` on its output. What stays
    trainable: the adapters, ``modules_to_save``, and biases as ``config.bias`` says.

    Raises:
        TypeError: ``config`` is not a registered method's config.
        ValueError: no module matched (naming close matches), a target of the wrong type, a
            model that already has adapters. The model is unchanged then.
    """
    plan = plan_injection(model, config)
    config = plan.targets.config
    keep_standard_layout(model)  # bitsandbytes layers: no CPU repacking that drops gradients
    for name, layer_class in plan.targets.targets:  # nothing can fail below this line
        layer = layer_class.build(model.get_submodule(name), config, name)
        layer_class.placement.attach(model, name, layer)
    state = InjectionState(
        config=config,
        targets=plan.targets.names,
        modules_to_save=plan.modules_to_save,
        skipped=plan.targets.skipped,
    )
    setattr(model, STATE_ATTR, state)
    mark_trainable(model, state)
    return injection_report(model)


def injection_report(model: nn.Module) -> InjectionReport:
    found = find_injection(model)
    if found is None:
        raise ValueError("the model has no adapters (inject_adapters was not called on it)")
    _, root, state = found
    report = InjectionReport(
        method=method_for(state.config).name,
        modules_to_save=list(state.modules_to_save),
        skipped=list(state.skipped),
    )
    for name, layer in root.named_modules():
        if isinstance(layer, AdapterLayer):
            kind, shape, rank = layer.describe()
            params = sum(layer.get_parameter(n).numel() for n in layer.adapter_parameter_names())
            target = clean_name(type(layer).placement.target_path(name))
            report.modules.append(AdaptedModule(target, kind, shape, rank, params))
    params = list({id(p): p for p in model.parameters()}.values())
    report.trainable_params = sum(parameter_count(p) for p in params if p.requires_grad)
    report.total_params = sum(parameter_count(p) for p in params)  # packed 4-bit: 2 per byte
    return report


def planned_tensors(model: nn.Module, config) -> dict[str, tuple[int, ...]]:
    """``{PEFT key: shape}`` of what ``save_adapter`` writes after ``inject_adapters(model,
    config)``, from the layer classes' declarations (``adapter_shapes``, ``peft_key``, the
    placement), computed on the model before injection. Raises as ``plan_injection``."""
    plan = plan_injection(model, config)
    config = plan.targets.config
    prefix = method_for(config).file_prefix
    shapes: dict[str, tuple[int, ...]] = {}
    replaced: dict[str, type[AdapterLayer]] = {}  # targets whose layer takes their place
    for name, layer_class in plan.targets.targets:
        layer_path = layer_class.placement.layer_path(name)
        if layer_path == name:
            replaced[name] = layer_class
        module = model.get_submodule(name)
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
