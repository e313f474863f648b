"""QLoRA on mixture-of-experts models (tiny Qwen3-MoE and Mixtral, transformers 5 layout):
what bitsandbytes quantizes when transformers loads them with a ``BitsAndBytesConfig``."""

import copy

import pytest
import torch
from torch import nn

from lightning_peft.core.bnb import bitsandbytes_kind, dequantized_weight
from lightning_peft.lightning.precision import load_quantized
from tests.helpers.quantized_models import NEEDS_BNB, TINY_MOE, no_cpu_packing, tiny_moe

pytestmark = NEEDS_BNB

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
QUANTIZED_CLASS = {"nf4": "Linear4bit", "int8": "Linear8bitLt"}


@pytest.fixture(scope="module", params=sorted(TINY_MOE))
def saved_moe(request, tmp_path_factory):
    """(architecture, directory of the float model, the float model)."""
    directory = tmp_path_factory.mktemp(request.param)
    model = tiny_moe(request.param)
    model.save_pretrained(directory)
    return request.param, directory, model


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_bitsandbytes_quantizes_attention_only_experts_and_router_stay_float(saved_moe, mode):
    """transformers' bitsandbytes integration swaps ``nn.Linear`` layers only: the attention
    projections become bitsandbytes layers, while the experts' fused 3-D parameters and the
    router's weight stay float, bit for bit the saved values (docs/qlora.md says so)."""
    _, directory, reference = saved_moe
    model = load_quantized(directory, mode)
    floats = dict(reference.named_parameters())
    for index, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{index}"
        for name in ATTENTION:
            module = getattr(layer.self_attn, name)
            assert type(module).__name__ == QUANTIZED_CLASS[mode], (prefix, name)
            assert bitsandbytes_kind(module) is not None
        experts, router = layer.mlp.experts, layer.mlp.gate
        assert not any(isinstance(m, nn.Linear) for m in experts.modules())
        for name in ("gate_up_proj", "down_proj"):
            parameter = getattr(experts, name)
            assert type(parameter) is nn.Parameter and parameter.dtype == torch.float32
            assert parameter.dim() == 3 and parameter.shape[0] == 4
            torch.testing.assert_close(
                parameter, floats[f"{prefix}.mlp.experts.{name}"], rtol=0, atol=0
            )
        assert type(router.weight) is nn.Parameter and router.weight.dtype == torch.float32
        torch.testing.assert_close(router.weight, floats[f"{prefix}.mlp.gate.weight"])
    assert type(model.lm_head) is nn.Linear  # the output layer stays float too
    quantized = [m for m in model.modules() if bitsandbytes_kind(m) is not None]
    assert len(quantized) == len(ATTENTION) * len(model.model.layers)


def test_quantized_moe_equals_the_float_model_with_rounded_attention(saved_moe):
    """The 4-bit model computes the float model with only its attention weights rounded to
    nf4: the float model given those de-quantized weights gives the same logits."""
    _, directory, reference = saved_moe
    model = no_cpu_packing(load_quantized(directory, "nf4")).eval()
    rounded = copy.deepcopy(reference)
    with torch.no_grad():
        for layer, source in zip(rounded.model.layers, model.model.layers, strict=True):
            for name in ATTENTION:
                weight = dequantized_weight(getattr(source.self_attn, name), torch.float32)
                getattr(layer.self_attn, name).weight.copy_(weight)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(input_ids=ids).logits
        want, unrounded = rounded(input_ids=ids).logits, reference(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, unrounded, rtol=1e-4, atol=1e-5)  # rounding does show
