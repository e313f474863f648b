"""The adapter methods, one module each, and the registry that the rest of the package asks.

A method module declares a ``Method`` (``methods.base``): its config class, its peft type, its
layer classes (tried in order for each target: the dispatch list), and how its
``adapter_config.json`` is written and read. Each layer class implements the ``AdapterLayer``
protocol: which modules it adapts, its tensors' shapes and saved keys, how it sits in the model
(``REPLACE`` or a ``ChildHook``), merge/unmerge where linear. Injection, the model helpers, the
PEFT format and LoRA+ loop over this registry and that protocol.

Adding a method: one module here, one entry in ``METHODS``, and its tests (the registry test
runs every registered method on every layer type it adapts).
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from lightning_peft.core.adapter import AdapterLayer, ChildHook, Method, Replace
from lightning_peft.methods.bottleneck.layers import BOTTLENECK
from lightning_peft.methods.ia3.layers import IA3
from lightning_peft.methods.lora.method import LORA
from lightning_peft.methods.prompt_tuning.layers import PROMPT_TUNING

METHODS: tuple[Method, ...] = (LORA, BOTTLENECK, IA3, PROMPT_TUNING)


def method_for(config: object) -> Method:
    """The method of ``config`` (a ``LoRAConfig``, ``AdapterConfig``, ...).

    Raises:
        TypeError: ``config`` is not the config of a registered method.
    """
    for method in METHODS:
        if isinstance(config, method.config_cls):
            return method
    names = " or ".join(m.config_cls.__name__ for m in METHODS)
    raise TypeError(f"config must be a {names}, got {type(config).__name__}")


def method_for_peft_type(peft_type: object) -> Method | None:
    """The method saved as ``peft_type`` in ``adapter_config.json``, or None."""
    return next((m for m in METHODS if m.peft_type == peft_type), None)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """``(path, layer)`` for every adapter layer in ``model``, each once."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


__all__ = [
    "METHODS",
    "AdapterLayer",
    "ChildHook",
    "Method",
    "Replace",
    "adapter_layers",
    "method_for",
    "method_for_peft_type",
]
