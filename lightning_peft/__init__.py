"""lightning-peft: parameter-efficient fine-tuning for PyTorch Lightning.

Adapter layers (LoRA, rsLoRA, DoRA, PiSSA init, bottleneck adapters), injection into any
``nn.Module``, merge/unmerge, and adapters in the Hugging Face PEFT format. The layers are thin
modules over the ``kernels`` ops.
"""

from lightning_peft.bottleneck import BottleneckAdapter
from lightning_peft.callback import PEFTCallback
from lightning_peft.config import AdapterConfig, LoRAConfig
from lightning_peft.distributed import fsdp2_shard
from lightning_peft.hf_format import load_adapter, save_adapter
from lightning_peft.injection import InjectionReport, inject_adapters, injection_report
from lightning_peft.lora_layer import LoRALinear
from lightning_peft.lora_plus import lora_plus_param_groups
from lightning_peft.model_helpers import (
    adapter_state_dict,
    disable_adapters,
    merge_adapters,
    trainable_parameters,
    unload,
    unmerge_adapters,
)

__all__ = [
    "AdapterConfig",
    "BottleneckAdapter",
    "InjectionReport",
    "LoRAConfig",
    "LoRALinear",
    "PEFTCallback",
    "adapter_state_dict",
    "disable_adapters",
    "fsdp2_shard",
    "inject_adapters",
    "injection_report",
    "load_adapter",
    "lora_plus_param_groups",
    "merge_adapters",
    "save_adapter",
    "trainable_parameters",
    "unload",
    "unmerge_adapters",
]
