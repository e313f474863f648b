"""QLoRA on mixture-of-experts models (tiny Qwen3-MoE, Mixtral, gpt-oss; transformers 5 layout):
what bitsandbytes quantizes when transformers loads them with a ``BitsAndBytesConfig``, and LoRA
on the experts of such a model (``target_parameters``) against peft 0.21.2 over the same
quantized base; experts that bitsandbytes' own parametrization quantizes are refused by name."""

import copy

import pytest
import torch
from torch import nn

from lightning_peft import LoRAConfig, disable_adapters, inject_adapters, save_adapter
from lightning_peft.core.bnb import bitsandbytes_kind, dequantized_weight
from lightning_peft.lightning.precision import load_quantized
from tests.helpers.peft_interop import our_grads, their_grads
from tests.helpers.quantized_models import NEEDS_BNB, no_cpu_packing
from tests.helpers.tiny_models import MOE_MODELS, snapshot, tokens

pytestmark = NEEDS_BNB

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERTS = ("gate_up_proj", "down_proj")
QUANTIZED_CLASS = {"nf4": "Linear4bit", "int8": "Linear8bitLt"}
ROUTER = {"qwen3_moe": "gate", "mixtral": "gate", "gpt_oss": "router"}
CONFIG = {
    "r": 3,
    "lora_alpha": 5,
    "target_modules": list(ATTENTION),
    "target_parameters": list(EXPERTS),
    "init_lora_weights": False,  # B != 0: the adapters change the output
}


@pytest.fixture(scope="module", params=sorted(MOE_MODELS))
def saved_moe(request, tmp_path_factory):
    """(architecture, directory of the float model, the float model)."""
    directory = tmp_path_factory.mktemp(request.param)
    model = MOE_MODELS[request.param]()
    model.save_pretrained(directory)
    return request.param, directory, model


def quantized(directory, mode):
    return no_cpu_packing(load_quantized(directory, mode)).eval()


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_bitsandbytes_quantizes_attention_only_experts_and_router_stay_float(saved_moe, mode):
    """transformers' bitsandbytes integration swaps ``nn.Linear`` layers only: the attention
    projections become bitsandbytes layers, while the experts' fused 3-D parameters and the
    router stay float, bit for bit the saved values (docs/qlora.md says so)."""
    family, directory, reference = saved_moe
    model = quantized(directory, mode)
    floats = dict(reference.named_parameters())
    for index, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{index}"
        for name in ATTENTION:
            module = getattr(layer.self_attn, name)
            assert type(module).__name__ == QUANTIZED_CLASS[mode], (prefix, name)
            assert bitsandbytes_kind(module) is not None
        experts, router = layer.mlp.experts, getattr(layer.mlp, ROUTER[family])
        assert not any(isinstance(m, nn.Linear) for m in experts.modules())
        for name in EXPERTS:
            parameter = getattr(experts, name)
            assert type(parameter) is nn.Parameter and parameter.dtype == torch.float32
            assert parameter.dim() == 3 and parameter.shape[0] == 4
            assert torch.equal(parameter, floats[f"{prefix}.mlp.experts.{name}"])
        assert type(router.weight) is nn.Parameter and router.weight.dtype == torch.float32
        assert torch.equal(router.weight, floats[f"{prefix}.mlp.{ROUTER[family]}.weight"])
    assert type(model.lm_head) is nn.Linear  # the output layer stays float too
    quantized_layers = [m for m in model.modules() if bitsandbytes_kind(m) is not None]
    assert len(quantized_layers) == len(ATTENTION) * len(model.model.layers)


def test_quantized_moe_equals_the_float_model_with_rounded_attention(saved_moe):
    """The 4-bit model computes the float model with only its attention weights rounded to
    nf4: the float model given those de-quantized weights gives the same logits."""
    _, directory, reference = saved_moe
    model = quantized(directory, "nf4")
    rounded = copy.deepcopy(reference)
    with torch.no_grad():
        for layer, source in zip(rounded.model.layers, model.model.layers, strict=True):
            for name in ATTENTION:
                weight = dequantized_weight(getattr(source.self_attn, name), torch.float32)
                getattr(layer.self_attn, name).weight.copy_(weight)
    ids = tokens()
    with torch.no_grad():
        got = model(input_ids=ids).logits
        want, unrounded = rounded(input_ids=ids).logits, reference(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, unrounded, rtol=1e-4, atol=1e-5)  # rounding does show


def _logits_and_grads(model, ids, grads_of):
    model.zero_grad(set_to_none=True)
    embeddings = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeddings).logits
    logits.square().mean().backward()
    return logits.detach(), grads_of(model), embeddings.grad


@pytest.mark.slow  # ~10 s for the six cases
@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_lora_on_experts_of_a_quantized_model_matches_peft(saved_moe, mode, tmp_path):
    """LoRA on the attention (bitsandbytes layers) and on the experts' fused parameters of a
    4-bit / 8-bit model: the expert adapters act (the output moves with B ≠ 0, every expert
    factor gets a non-zero gradient) and ours equals peft's over the same quantized base."""
    family, directory, _ = saved_moe
    ids = tokens(batch=3, length=6)
    ours = quantized(directory, mode)
    with torch.no_grad():
        plain = ours(input_ids=ids).logits
    report = inject_adapters(ours, LoRAConfig(**CONFIG))
    kinds = {m.kind for m in report.modules}
    assert "LoRA (experts)" in kinds and any(k.startswith("LoRA over") for k in kinds), kinds
    save_adapter(ours, tmp_path)

    import peft

    theirs = peft.PeftModel.from_pretrained(quantized(directory, mode), tmp_path, is_trainable=True)
    y_ours, g_ours, dx_ours = _logits_and_grads(ours, ids, our_grads)
    y_theirs, g_theirs, dx_theirs = _logits_and_grads(theirs, ids, their_grads)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
    assert g_ours.keys() == g_theirs.keys()
    expert_keys = [k for k in g_ours if ".mlp.experts." in k]
    assert len(expert_keys) == 2 * len(EXPERTS) * len(ours.model.layers)
    worst = 0.0
    for key in [*g_ours, "input"]:
        grad, peer = (dx_ours, dx_theirs) if key == "input" else (g_ours[key], g_theirs[key])
        scale = float(peer.abs().max())
        assert scale > 0, key  # every adapter factor, the experts' included, gets a gradient
        torch.testing.assert_close(grad, peer, rtol=1e-4, atol=1e-5 * scale, msg=key)
        worst = max(worst, float((grad - peer).abs().max()) / scale)
    difference = float((y_ours - y_theirs).abs().max())
    print(f"\n{family} {mode}: out {difference:.1e}, grad {worst:.1e}")
    assert (y_ours - plain).abs().max() > 1e-3  # the adapters change the output...
    with disable_adapters(ours), torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, plain)  # ...and only they do


def test_experts_quantized_by_a_bitsandbytes_parametrization_are_refused_by_name(saved_moe):
    """bitsandbytes' ``replace_parameter_4bit`` quantizes a 3-D expert parameter behind a
    ``torch.nn.utils.parametrize`` parametrization: refused, naming the parameter, the model
    untouched (peft 0.21.2 skips such a parameter without a word)."""
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    _, directory, _ = saved_moe
    model = quantized(directory, "nf4")
    for layer in model.model.layers:
        for name in EXPERTS:
            replace_parameter_4bit(layer.mlp.experts, name, quant_type="nf4")
    before = snapshot(model)
    with pytest.raises(
        ValueError,
        match=r"'model\.layers\.0\.mlp\.experts\.gate_up_proj'.*"
        "parametrization.*Bnb4bitParametrization",
    ):
        inject_adapters(model, LoRAConfig(**CONFIG))
    after = snapshot(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key], before[key]) for key in before)
    assert not any("lora" in name for name, _ in model.named_parameters())
