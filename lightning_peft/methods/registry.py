"""The registry of adapter methods that the layers above ask (injection, the model helpers, the
PEFT format, LoRA+, the callback, the command).

A method package declares a ``Method`` (``lightning_peft.core.adapter``): its config class, its
peft type, its layer classes (tried in order for each target: the dispatch list), and how its
``adapter_config.json`` is written and read. Each layer class implements the ``AdapterLayer``
protocol: which modules it adapts, its tensors' shapes and saved keys, how it sits in the model
(``REPLACE`` or a ``ChildHook``), merge/unmerge where linear. Injection, the model helpers, the
PEFT format and LoRA+ loop over this registry and that protocol.

Adding a method: one package in ``lightning_peft.methods`` and one entry in ``METHODS`` (or
``register(method)`` from outside the package, ``unregister`` to take it back), and its tests
(the registry test runs every registered method on every layer type it adapts).
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from lightning_peft.core.adapter import AdapterLayer, ChildHook, Method, Replace
from lightning_peft.methods.bottleneck.layers import BOTTLENECK
from lightning_peft.methods.ia3.layers import IA3
from lightning_peft.methods.lora.method import LORA
from lightning_peft.methods.prompt_tuning.layers import PROMPT_TUNING

# In the order the command lists them; a list so that ``register`` reaches every importer.
METHODS: list[Method] = [LORA, BOTTLENECK, IA3, PROMPT_TUNING]


def register(method: Method) -> Method:
    """Add ``method`` to the registry (after the built-in ones); returns it.

    Raises:
        ValueError: a registered method has its name, peft type, config class or one of its
            ``--method`` names.
    """
    for other in METHODS:
        clash = (
            "name" if other.name == method.name
            else "peft_type" if other.peft_type == method.peft_type
            else "config class" if other.config_cls is method.config_cls
            else None
        )  # fmt: skip
        if clash is None and other.command_line and method.command_line:
            if set(other.command_line.choices) & set(method.command_line.choices):
                clash = "--method name"
        if clash is not None:
            raise ValueError(f"method {method.name!r}: {other.name!r} has the same {clash}")
    METHODS.append(method)
    return method


def unregister(method: Method) -> None:
    """Take ``method`` out of the registry (a no-op if it is not there)."""
    if method in METHODS:
        METHODS.remove(method)


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
    "register",
    "unregister",
]
