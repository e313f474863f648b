"""Model-level helpers: merge, unmerge, unload, disable, adapter state dict, trainables."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from lightning_peft.bottleneck import CHILD_NAME, BottleneckAdapter, detach_bottleneck
from lightning_peft.distributed import clean_name
from lightning_peft.injection import STATE_ATTR, find_injection
from lightning_peft.lora_layer import LoRALinear


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def _bottlenecks(model: nn.Module) -> list[BottleneckAdapter]:
    return [m for m in model.modules() if isinstance(m, BottleneckAdapter)]


def merge_adapters(model: nn.Module) -> int:
    """Merge every LoRA/DoRA layer into its base weight (idempotent); returns how many.

    Raises:
        ValueError: the model has bottleneck adapters, which are non-linear and cannot merge.
    """
    if _bottlenecks(model):
        raise ValueError("bottleneck adapters are non-linear and cannot be merged into weights")
    layers = lora_layers(model)
    for layer in layers:
        layer.merge()
    return len(layers)


def unmerge_adapters(model: nn.Module) -> int:
    """Undo ``merge_adapters`` (idempotent); returns how many layers."""
    layers = lora_layers(model)
    for layer in layers:
        layer.unmerge()
    return len(layers)


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove every adapter, putting the original modules back; with ``merge`` LoRA/DoRA
    updates are merged into their weights first, else they are dropped (the base returns).

    Parameters keep their ``requires_grad`` flags as they are; returns ``model``.
    """
    if merge:
        merge_adapters(model)
    else:
        unmerge_adapters(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            base = module.base_module
            base.weight, base.bias = module.weight, module.bias
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, base)
        elif hasattr(module, CHILD_NAME) and isinstance(
            getattr(module, CHILD_NAME), BottleneckAdapter
        ):
            detach_bottleneck(module)
    found = find_injection(model)
    if found is not None:
        delattr(found[1], STATE_ATTR)
    return model


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as the base model inside the block (adapters skipped), then restore."""
    adapters = [*lora_layers(model), *_bottlenecks(model)]
    before = [a.disabled for a in adapters]
    try:
        for adapter in adapters:
            adapter.disabled = True
        yield model
    finally:
        for adapter, flag in zip(adapters, before, strict=True):
            adapter.disabled = flag


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors, ``modules_to_save`` and trained biases, keyed as in
    ``model.state_dict()`` (FSDP1 wrapper segments removed); detached, not copied."""
    found = find_injection(model)
    if found is None:
        raise ValueError("the model has no adapters (inject_adapters was not called on it)")
    prefix, root, state = found
    prefix = f"{prefix}." if prefix else ""
    keys: dict[str, Tensor] = {}
    for name, param in root.named_parameters(remove_duplicate=False):
        module_name, _, param_name = name.rpartition(".")
        module = root.get_submodule(module_name)
        is_adapter = (
            isinstance(module, LoRALinear) and param_name in module.adapter_parameter_names()
        ) or f".{CHILD_NAME}." in f".{name}"
        is_saved = any(name == m or name.startswith(f"{m}.") for m in state.modules_to_save)
        is_bias = state.config.bias != "none" and param_name == "bias" and param.requires_grad
        if is_adapter or is_saved or is_bias:
            keys[clean_name(prefix + name)] = param.detach()
    return keys


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` of every parameter that requires grad."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}
