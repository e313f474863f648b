"""``inject_adapters``: put adapters into any ``nn.Module`` in place and freeze the rest."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_peft.bottleneck import BottleneckAdapter, attach_bottleneck, output_features
from lightning_peft.config import AdapterConfig, LoRAConfig
from lightning_peft.lora_layer import LoRALinear
from lightning_peft.targeting import select_targets

STATE_ATTR = "lightning_peft_state"


@dataclass
class InjectionState:
    """Kept on the injected root module: what was injected, for saving and unloading."""

    config: LoRAConfig | AdapterConfig
    targets: list[str]
    modules_to_save: list[str]


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
            f"({100 * self.trainable_fraction:.3f}%) in {len(self.modules)} adapted modules",
        ]
        return "\n".join(lines)

    __str__ = table


def find_injection(model: nn.Module) -> tuple[str, nn.Module, InjectionState] | None:
    """``(prefix, root, state)`` of the injected root at or below ``model``, or None."""
    for prefix, module in model.named_modules():
        state = getattr(module, STATE_ATTR, None)
        if isinstance(state, InjectionState):
            return prefix, module, state
    return None


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _build(model: nn.Module, name: str, config: LoRAConfig | AdapterConfig) -> nn.Module:
    module = model.get_submodule(name)
    if isinstance(config, AdapterConfig):
        return BottleneckAdapter(
            output_features(module),
            config.bottleneck_dim,
            activation=config.activation,
            dropout=config.dropout,
            scaling=config.scaling,
            dtype=_dtype(config.adapter_dtype),
            device=next(module.parameters()).device
            if any(True for _ in module.parameters())
            else None,
        )
    rank, alpha = config.rank_and_alpha(name)
    return LoRALinear(
        module,
        rank,
        alpha,
        dropout=config.lora_dropout,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        init_lora_weights=config.init_lora_weights,
        adapter_dtype=_dtype(config.adapter_dtype),
        backend=config.backend,
    )


def _check_injectable(model: nn.Module, config, targets: list[str]) -> None:
    """Everything that could fail, checked before the model is touched."""
    if find_injection(model) is not None or any(
        isinstance(m, (LoRALinear, BottleneckAdapter)) for m in model.modules()
    ):
        raise ValueError(
            "the model already has adapters; call unload(model) before injecting again"
        )
    if isinstance(config, AdapterConfig):
        for name in targets:
            output_features(model.get_submodule(name))
        return
    for name in targets:
        rank, _ = config.rank_and_alpha(name)
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank_pattern gives {name!r} rank {rank!r}; ranks must be ints >= 1")
        layer = model.get_submodule(name)
        if config.init_lora_weights == "pissa" and rank > min(layer.weight.shape):
            raise ValueError(
                f"pissa needs r <= min(out, in) = {min(layer.weight.shape)} at {name!r}, got {rank}"
            )


def modules_to_save_names(model: nn.Module, config) -> list[str]:
    """Modules trained in full. peft's rule: the name ends with an entry (no dot needed)."""
    if not config.modules_to_save:
        return []
    names = [
        n
        for n, _ in model.named_modules()
        if n and any(n.endswith(m) for m in config.modules_to_save)
    ]
    if not names:
        raise ValueError(f"no module matched modules_to_save={config.modules_to_save!r}")
    return names


def mark_trainable(model: nn.Module, state: InjectionState) -> None:
    """Freeze everything, then unfreeze adapters, ``modules_to_save`` and the chosen biases."""
    model.requires_grad_(False)
    for name in state.targets:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            for param_name in module.adapter_parameter_names():
                getattr(module, param_name).requires_grad_(True)
            if state.config.bias == "lora_only" and module.bias is not None:
                module.bias.requires_grad_(True)
        else:
            module.get_submodule("bottleneck_adapter").requires_grad_(True)
            if state.config.bias == "lora_only":
                for param_name, param in module.named_parameters():
                    if param_name.endswith("bias") and "bottleneck_adapter" not in param_name:
                        param.requires_grad_(True)
    if state.config.bias == "all":
        for param_name, param in model.named_parameters():
            if param_name.endswith("bias"):
                param.requires_grad_(True)
    for name in state.modules_to_save:
        model.get_submodule(name).requires_grad_(True)


def inject_adapters(model: nn.Module, config: LoRAConfig | AdapterConfig) -> InjectionReport:
    """Replace the target modules of ``model`` in place and freeze everything else.

    LoRA/DoRA: each target ``nn.Linear``/``Conv1D`` becomes a ``LoRALinear`` sharing its
    parameters. Adapters: each target gets a ``BottleneckAdapter`` on its output. What stays
    trainable: the adapters, ``modules_to_save``, and biases as ``config.bias`` says.

    Raises:
        ValueError: no module matched (with a sample of module names), a target of the wrong
            type, or a model that already has adapters. The model is unchanged then.
    """
    if not isinstance(config, (LoRAConfig, AdapterConfig)):
        raise TypeError(
            f"config must be a LoRAConfig or AdapterConfig, got {type(config).__name__}"
        )
    targets = select_targets(model, config)
    save_names = modules_to_save_names(model, config)
    _check_injectable(model, config, targets)

    for name in targets:  # nothing can fail below this line
        new = _build(model, name, config)
        if isinstance(new, BottleneckAdapter):
            attach_bottleneck(model.get_submodule(name), new)
        else:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, new)
    state = InjectionState(config=config, targets=targets, modules_to_save=save_names)
    setattr(model, STATE_ATTR, state)
    mark_trainable(model, state)
    return injection_report(model)


def injection_report(model: nn.Module) -> InjectionReport:
    found = find_injection(model)
    if found is None:
        raise ValueError("the model has no adapters (inject_adapters was not called on it)")
    _, root, state = found
    report = InjectionReport(
        method=state.config.method, modules_to_save=list(state.modules_to_save)
    )
    for name in state.targets:
        module = root.get_submodule(name)
        if isinstance(module, LoRALinear):
            kind, shape, rank = (
                "DoRA" if module.use_dora else "LoRA",
                f"{module.in_features}->{module.out_features}",
                module.r,
            )
            params = sum(getattr(module, n).numel() for n in module.adapter_parameter_names())
        else:
            adapter = module.get_submodule("bottleneck_adapter")
            kind, rank = "Adapter", adapter.down.out_features
            shape = f"{adapter.down.in_features}->{rank}->{adapter.up.out_features}"
            params = sum(p.numel() for p in adapter.parameters())
        report.modules.append(AdaptedModule(name, kind, shape, rank, params))
    params = list({id(p): p for p in model.parameters()}.values())
    report.trainable_params = sum(p.numel() for p in params if p.requires_grad)
    report.total_params = sum(p.numel() for p in params)
    return report
