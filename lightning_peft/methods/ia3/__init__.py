"""IA³: the config (``config``), the layers and the registered method (``layers``)."""

from lightning_peft.methods.ia3.config import IA3Config
from lightning_peft.methods.ia3.layers import IA3, IA3Conv, IA3Linear

__all__ = ["IA3", "IA3Config", "IA3Conv", "IA3Linear"]
