"""Tiny transformers models built from configs (no download), and their inputs."""

from __future__ import annotations

import torch


def tiny_llama(seed: int = 0, **config):
    """A 2-layer Llama (hidden 32, GQA 4/2 heads, vocabulary 64) with random weights, in eval
    mode; ``config`` overrides or adds ``LlamaConfig`` fields (the vocabulary of a real
    tokenizer, tied embeddings, another size)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    fields = {
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 64,
    }
    return LlamaForCausalLM(LlamaConfig(**{**fields, **config})).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=4,
        vocab_size=64,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=64,
        num_labels=3,
    )
    return BertForSequenceClassification(config).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}
# Two attention projections per family, as users target them.
TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"]}


def tokens(seed: int = 1, batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def snapshot(model) -> dict[str, torch.Tensor]:
    """A copy of every state-dict tensor, to check later that nothing changed."""
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def files(directory) -> dict[str, bytes]:
    """Every file under ``directory`` (relative name -> bytes), hidden ones included."""
    from pathlib import Path

    root = Path(directory)
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def tiny_qwen3_moe(seed: int = 0, **config):
    """A 2-layer Qwen3-MoE (hidden 32, 4 experts of width 16, top-2, vocabulary 64) with random
    weights (the router too: transformers initialises it to zeros), in eval mode."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    fields = {
        "hidden_size": 32,
        "intermediate_size": 48,
        "moe_intermediate_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "vocab_size": 64,
        "num_experts": 4,
        "num_experts_per_tok": 2,
    }
    return _random_moe(Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**fields, **config})), seed)


def tiny_mixtral(seed: int = 0, **config):
    """A 2-layer Mixtral (hidden 32, 4 experts of width 24, top-2, vocabulary 64)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    fields = {
        "hidden_size": 32,
        "intermediate_size": 24,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "vocab_size": 64,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
    }
    return _random_moe(MixtralForCausalLM(MixtralConfig(**{**fields, **config})), seed)


def tiny_gpt_oss(seed: int = 0, **config):
    """A 2-layer gpt-oss (hidden 32, 4 experts of width 16, top-2, transposed expert weights
    with biases, interleaved gate/up), eager attention."""
    from transformers import GptOssConfig, GptOssForCausalLM

    fields = {
        "hidden_size": 32,
        "intermediate_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "vocab_size": 64,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "layer_types": ["sliding_attention", "full_attention"],
        "attn_implementation": "eager",
    }
    return _random_moe(GptOssForCausalLM(GptOssConfig(**{**fields, **config})), seed)


def _random_moe(model, seed: int):
    """Every floating parameter drawn from N(0, 0.1²) (transformers leaves some at zero or
    uninitialised in a model built from a config), in eval mode."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0, 0.1)
    return model.eval()


MOE_MODELS = {"qwen3_moe": tiny_qwen3_moe, "mixtral": tiny_mixtral, "gpt_oss": tiny_gpt_oss}
