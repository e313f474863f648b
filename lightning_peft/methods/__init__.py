"""The adapter methods, one package each (``lora``, ``bottleneck``, ``ia3``, ``prompt_tuning``),
and the registry that the layers above ask (``registry``).

A method package declares a ``Method`` (``lightning_peft.core.adapter``): its config class, its
peft type, its layer classes (tried in order for each target: the dispatch list), how its
``adapter_config.json`` is written and read, and its command-line options. Adding a method: one
package here, one entry in ``registry.METHODS`` (``register`` from outside the package), and its
tests.
"""

from lightning_peft.core.adapter import AdapterLayer, ChildHook, Method, Replace
from lightning_peft.methods.registry import (
    METHODS,
    adapter_layers,
    method_for,
    method_for_peft_type,
    register,
    unregister,
)

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
