"""lightning-peft: parameter-efficient fine-tuning for PyTorch Lightning.

Adapter layers (LoRA, rsLoRA, DoRA, PiSSA and OLoRA inits, ``lora_bias``, on linear, convolution
and embedding layers; bottleneck adapters; IA³; prompt tuning), injection into any ``nn.Module``,
merge/unmerge, and adapters in the Hugging Face PEFT format. Each method is one module in
``lightning_peft.methods``, found through its registry; the layers are thin modules over the
``peft_kernels`` ops.
"""

from lightning_peft.callback import PEFTCallback
from lightning_peft.config import AdapterConfig, LoRAConfig
from lightning_peft.distributed import fsdp2_shard
from lightning_peft.hf_format import check_save_directory, load_adapter, read_config, save_adapter
from lightning_peft.injection import (
    InjectionReport,
    find_injection,
    inject_adapters,
    injection_report,
)
from lightning_peft.lora_plus import lora_plus_param_groups
from lightning_peft.methods import METHODS, AdapterLayer, method_for
from lightning_peft.methods.bottleneck import BottleneckAdapter
from lightning_peft.methods.ia3 import IA3Config, IA3Conv, IA3Linear
from lightning_peft.methods.lora import LoRALinear
from lightning_peft.methods.lora_conv import LoRAConv
from lightning_peft.methods.lora_embedding import LoRAEmbedding
from lightning_peft.methods.lora_mha import LoRAMultiheadAttention
from lightning_peft.methods.prompt_tuning import PromptEmbedding, PromptTuningConfig
from lightning_peft.model_helpers import (
    adapter_state_dict,
    disable_adapters,
    merge_adapters,
    trainable_parameters,
    unload,
    unmerge_adapters,
)
from lightning_peft.targeting import select_targets

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
    "adapter_state_dict",
    "check_save_directory",
    "disable_adapters",
    "find_injection",
    "fsdp2_shard",
    "inject_adapters",
    "injection_report",
    "load_adapter",
    "lora_plus_param_groups",
    "merge_adapters",
    "method_for",
    "read_config",
    "save_adapter",
    "select_targets",
    "trainable_parameters",
    "unload",
    "unmerge_adapters",
]
