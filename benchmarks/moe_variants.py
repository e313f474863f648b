"""The mixture-of-experts benchmark's model and contestants (``python -m benchmarks moe``).

A Qwen3-MoE-shaped causal LM with random weights (speed and memory do not depend on the values),
every weight frozen, shared by all variants (``shared_copy``):

- ``floor``: no adapters; a step backpropagates to the input embeddings only (``inputs_embeds``
  requires grad), as in ``python -m benchmarks model``: the cost no adapter can avoid.
- ``peft``: peft's LoRA, ``target_modules`` = the attention projections and
  ``target_parameters`` = the experts' fused ``gate_up_proj`` (E, 2I, H) and ``down_proj``
  (E, H, I): its ``ParamWrapper`` forms ΔW = B·A for all E experts on every forward.
- ``ours``: lightning-peft's LoRA, loaded from the adapter directory peft wrote (the same
  targets and the same values: B non-zero, so the adapters do real work).

A step of an adapted variant is forward with ``labels`` (the causal-LM loss), backward and an
AdamW step over the adapter parameters; the floor has nothing to update.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from benchmarks.model_variants import PEFT_KEY_PREFIX, shared_copy

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


@dataclasses.dataclass(frozen=True)
class MoEShape:
    """A Qwen3-MoE config's sizes (every layer sparse)."""

    hidden: int
    experts: int
    top_k: int
    layers: int
    expert_intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    def config(self, experts_implementation: str | None = None):
        from transformers import Qwen3MoeConfig

        config = Qwen3MoeConfig(
            hidden_size=self.hidden,
            intermediate_size=2 * self.expert_intermediate,  # dense MLPs: none (all sparse)
            moe_intermediate_size=self.expert_intermediate,
            num_experts=self.experts,
            num_experts_per_tok=self.top_k,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            vocab_size=self.vocab,
            max_position_embeddings=4096,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
            tie_word_embeddings=False,
        )
        if experts_implementation is not None:
            config._experts_implementation = experts_implementation
        return config


SHAPES = {
    # sized for a 2-core CPU: a step of the floor takes about a second at 4x256 tokens
    "cpu": MoEShape(512, 16, 2, 4, 256, 8, 4, 64, 1024),
    # the GPU check's shape (Qwen3-30B-A3B's layer: hidden 2048, E=64 of its 128, top-8)
    "gpu": MoEShape(2048, 64, 8, 4, 768, 32, 4, 128, 8192),
    # --quick (the tests): seconds on one thread; expert sizes no multiple of anything
    "tiny": MoEShape(48, 4, 2, 2, 40, 4, 2, 12, 256),
}


def load_base_model(
    shape: MoEShape, dtype: torch.dtype, device: torch.device, experts_implementation: str | None
) -> nn.Module:
    """The random-weight model of ``shape``, frozen."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(shape.config(experts_implementation))
    model.to(device=device, dtype=dtype)
    model.requires_grad_(False)
    return model


def experts_implementation(model: nn.Module) -> str:
    """The experts forward transformers selected (``eager``, ``batched_mm``, ``grouped_mm``)."""
    return str(getattr(model.config, "_experts_implementation", None) or "eager")


def peft_config(rank: int, alpha: float):
    import peft

    return peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=list(ATTENTION),
        target_parameters=list(EXPERT_PARAMETERS),
    )


def write_peft_adapter(base: nn.Module, rank: int, alpha: float, directory: Path) -> None:
    """peft's adapter for ``base`` with random A and B (B at a small scale, as after some
    training), saved in the PEFT format to ``directory``."""
    import peft

    model = peft.get_peft_model(shared_copy(base), peft_config(rank, alpha))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.copy_(0.02 * noise.to(parameter.dtype))
    model.save_pretrained(directory)


def build_peft(base: nn.Module, rank: int, alpha: float, directory: Path) -> nn.Module:
    """peft's LoRA on a weight-sharing copy of ``base``, holding the adapter of ``directory``."""
    import peft
    from peft.tuners.tuners_utils import cast_adapter_dtype
    from safetensors.torch import load_file

    model = peft.inject_adapter_in_model(peft_config(rank, alpha), shared_copy(base))
    cast_adapter_dtype(model, adapter_name="default")  # float32 adapters on a bf16 base
    tensors = load_file(directory / "adapter_model.safetensors")
    tensors = {key.removeprefix(PEFT_KEY_PREFIX): value for key, value in tensors.items()}
    result = peft.set_peft_model_state_dict(model, tensors)
    missing = [key for key in result.missing_keys if "lora_" in key]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"peft did not take its own adapter: missing {missing[:3]}, "
            f"unexpected {list(result.unexpected_keys)[:3]}"
        )
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    model.train()
    return model


def build_ours(base: nn.Module, directory: Path) -> nn.Module | str:
    """lightning-peft on a weight-sharing copy of ``base``, loading peft's adapter directory;
    or, where this lightning-peft refuses peft's ``target_parameters`` (no LoRA on experts),
    its refusal (any other error propagates)."""
    from lightning_peft import load_adapter

    try:
        model = load_adapter(shared_copy(base), directory)
    except ValueError as error:
        if "target_parameters" not in str(error):
            raise
        return f"lightning-peft refuses the adapter: {error}"
    model.train()
    return model


def materialised_delta_bytes(base: nn.Module, adapter_dtype: torch.dtype) -> int:
    """Bytes of the ΔW = B·A that peft's ``ParamWrapper`` forms per forward, all layers: one
    (E, out, in) tensor per adapted expert parameter, in the adapters' dtype (its gradient in
    backward is as large again)."""
    size = torch.tensor([], dtype=adapter_dtype).element_size()
    total = 0
    for name, parameter in base.named_parameters():
        if any(name.endswith(target) for target in EXPERT_PARAMETERS):
            total += parameter.numel() * size
    return total
