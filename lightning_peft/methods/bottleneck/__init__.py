"""Bottleneck adapters: the config (``config``), the adapter layer and the registered method
(``layers``)."""

from lightning_peft.methods.bottleneck.config import AdapterConfig
from lightning_peft.methods.bottleneck.layers import BOTTLENECK, BottleneckAdapter

__all__ = ["BOTTLENECK", "AdapterConfig", "BottleneckAdapter"]
