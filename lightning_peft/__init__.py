"""lightning-peft: parameter-efficient fine-tuning for PyTorch Lightning.

Adapter layers (LoRA, rsLoRA, DoRA, PiSSA and OLoRA inits, ``lora_bias``, on linear, convolution
and embedding layers; bottleneck adapters; IA³; prompt tuning), injection into any ``nn.Module``,
merge/unmerge, and adapters in the Hugging Face PEFT format. Each method is one package in
``lightning_peft.methods``, found through its registry; the layers are thin modules over the
``peft_kernels`` ops.

Layers, each importing only from those below it (a contract in ``pyproject.toml``, checked by
``lint-imports``): ``peft_kernels`` ← ``core`` ← ``methods`` ← ``model`` ← ``peft_format`` ←
``lightning`` ← ``cli``. The names below load lazily (PEP 562), so ``import lightning_peft.core``,
``.methods`` or ``.model`` never imports Lightning; ``PEFTCallback`` does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS = {
    "AdapterConfig": "lightning_peft.methods.bottleneck.config",
    "AdapterLayer": "lightning_peft.core.adapter",
    "BottleneckAdapter": "lightning_peft.methods.bottleneck.layers",
    "IA3Config": "lightning_peft.methods.ia3.config",
    "IA3Conv": "lightning_peft.methods.ia3.layers",
    "IA3Linear": "lightning_peft.methods.ia3.layers",
    "InjectionReport": "lightning_peft.model.injection",
    "LoRAConfig": "lightning_peft.methods.lora.config",
    "LoRAConv": "lightning_peft.methods.lora.conv",
    "LoRAEmbedding": "lightning_peft.methods.lora.embedding",
    "LoRALinear": "lightning_peft.methods.lora.linear",
    "LoRAMultiheadAttention": "lightning_peft.methods.lora.mha",
    "METHODS": "lightning_peft.methods.registry",
    "PEFTCallback": "lightning_peft.lightning.callback",
    "PromptEmbedding": "lightning_peft.methods.prompt_tuning.layers",
    "PromptTuningConfig": "lightning_peft.methods.prompt_tuning.config",
    "active_adapters": "lightning_peft.model.named",
    "adapter_names": "lightning_peft.model.named",
    "adapter_state_dict": "lightning_peft.model.helpers",
    "check_save_directory": "lightning_peft.peft_format.files",
    "delete_adapter": "lightning_peft.model.named",
    "disable_adapters": "lightning_peft.model.helpers",
    "find_injection": "lightning_peft.model.injection",
    "fsdp2_shard": "lightning_peft.lightning.distributed",
    "inject_adapters": "lightning_peft.model.injection",
    "injection_report": "lightning_peft.model.injection",
    "load_adapter": "lightning_peft.peft_format.files",
    "lora_plus_param_groups": "lightning_peft.model.lora_plus",
    "merge_adapters": "lightning_peft.model.helpers",
    "method_for": "lightning_peft.methods.registry",
    "mixed_batch": "lightning_peft.model.mixed",
    "read_config": "lightning_peft.peft_format.files",
    "save_adapter": "lightning_peft.peft_format.files",
    "select_targets": "lightning_peft.model.targeting",
    "set_active_adapters": "lightning_peft.model.named",
    "trainable_parameters": "lightning_peft.model.helpers",
    "unload": "lightning_peft.model.helpers",
    "unmerge_adapters": "lightning_peft.model.helpers",
}

__all__ = [
    "METHODS",
    "AdapterConfig",
    "AdapterLayer",
    "BottleneckAdapter",
    "IA3Config",
    "IA3Conv",
    "IA3Linear",
    "InjectionReport",
    "LoRAConfig",
    "LoRAConv",
    "LoRAEmbedding",
    "LoRALinear",
    "LoRAMultiheadAttention",
    "PEFTCallback",
    "PromptEmbedding",
    "PromptTuningConfig",
    "active_adapters",
    "adapter_names",
    "adapter_state_dict",
    "check_save_directory",
    "delete_adapter",
    "disable_adapters",
    "find_injection",
    "fsdp2_shard",
    "inject_adapters",
    "injection_report",
    "load_adapter",
    "lora_plus_param_groups",
    "merge_adapters",
    "method_for",
    "mixed_batch",
    "read_config",
    "save_adapter",
    "select_targets",
    "set_active_adapters",
    "trainable_parameters",
    "unload",
    "unmerge_adapters",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:
    from lightning_peft.core.adapter import AdapterLayer
    from lightning_peft.lightning.callback import PEFTCallback
    from lightning_peft.lightning.distributed import fsdp2_shard
    from lightning_peft.methods.bottleneck.config import AdapterConfig
    from lightning_peft.methods.bottleneck.layers import BottleneckAdapter
    from lightning_peft.methods.ia3.config import IA3Config
    from lightning_peft.methods.ia3.layers import IA3Conv, IA3Linear
    from lightning_peft.methods.lora.config import LoRAConfig
    from lightning_peft.methods.lora.conv import LoRAConv
    from lightning_peft.methods.lora.embedding import LoRAEmbedding
    from lightning_peft.methods.lora.linear import LoRALinear
    from lightning_peft.methods.lora.mha import LoRAMultiheadAttention
    from lightning_peft.methods.prompt_tuning.config import PromptTuningConfig
    from lightning_peft.methods.prompt_tuning.layers import PromptEmbedding
    from lightning_peft.methods.registry import METHODS, method_for
    from lightning_peft.model.helpers import (
        adapter_state_dict,
        disable_adapters,
        merge_adapters,
        trainable_parameters,
        unload,
        unmerge_adapters,
    )
    from lightning_peft.model.injection import (
        InjectionReport,
        find_injection,
        inject_adapters,
        injection_report,
    )
    from lightning_peft.model.lora_plus import lora_plus_param_groups
    from lightning_peft.model.mixed import mixed_batch
    from lightning_peft.model.named import (
        active_adapters,
        adapter_names,
        delete_adapter,
        set_active_adapters,
    )
    from lightning_peft.model.targeting import select_targets
    from lightning_peft.peft_format.files import (
        check_save_directory,
        load_adapter,
        read_config,
        save_adapter,
    )
