"""LoRA on nn.MultiheadAttention (optional in issue 12; peft's ``lora.MultiheadAttention`` design,
with out_proj's update added once): against a reference and against the real peft, with masks,
``batch_first`` and bias_k/bias_v; what it refuses, by name."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_peft import (
    LoRAConfig,
    inject_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
    unmerge_adapters,
)
from lightning_peft.methods.lora.mha import LoRAMultiheadAttention


class Attention(nn.Module):
    """Self-attention with the options peft's layer must pass through (masks, batch_first)."""

    def __init__(self, batch_first: bool = False, add_bias_kv: bool = False, bias: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.mha = nn.MultiheadAttention(
            12, 3, batch_first=batch_first, add_bias_kv=add_bias_kv, bias=bias
        )
        self.lin0 = nn.Linear(12, 2)
        self.batch_first = batch_first

    def forward(self, x):
        length = x.shape[1] if self.batch_first else x.shape[0]
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
        y, weights = self.mha(x, x, x, attn_mask=causal, need_weights=True)
        return self.lin0(y) + weights.sum()


CASES = {
    "seq-first": ({}, (5, 2, 12)),
    "batch-first": ({"batch_first": True}, (2, 5, 12)),
    "bias-kv": ({"add_bias_kv": True}, (5, 2, 12)),
    "no-bias": ({"bias": False}, (5, 2, 12)),
}


def peft_attention(model, config):
    import peft

    return peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**config))


@pytest.mark.parametrize("case", list(CASES))
def test_files_move_both_ways_and_only_peft_s_double_out_proj_update_differs(case, tmp_path):
    """peft 0.21.2 adds out_proj's update twice in forward and merge (huggingface/peft#3774,
    open): its outputs are ours with out_proj's B doubled. Files load both ways (same keys and
    shapes); the in_proj update, masks, batch_first and bias_k/bias_v agree exactly."""
    pytest.importorskip("peft")
    options, shape = CASES[case]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    base = Attention(**options)
    config = {"r": 2, "target_modules": ["mha", "lin0"], "init_lora_weights": False}
    theirs = peft_attention(base, config)
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    with torch.no_grad():
        ours.mha.out_lora_B.mul_(2)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        ours.mha.out_lora_B.zero_()  # no out_proj update: no difference left
        theirs.base_model.model.mha.base_layer.out_proj.lora_B["default"].weight.zero_()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    save_adapter(ours, tmp_path / "ours")
    import peft

    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(ours(x), reloaded(x), rtol=1e-5, atol=1e-5)


def test_the_update_is_the_weights_plus_the_low_rank_products():
    base = Attention()
    model = copy.deepcopy(base)
    inject_adapters(
        model, LoRAConfig(r=2, lora_alpha=4, target_modules=["mha"], init_lora_weights=False)
    )
    layer = model.mha
    assert isinstance(layer, LoRAMultiheadAttention)
    assert (
        model.state_dict().keys() - {"mha.lora_A", "mha.lora_B", "mha.out_lora_A", "mha.out_lora_B"}
        == base.state_dict().keys()
    )
    x = torch.randn(4, 2, 12)
    with torch.no_grad():
        reference = copy.deepcopy(base)
        reference.mha.in_proj_weight += 2 * layer.lora_B @ layer.lora_A
        reference.mha.out_proj.weight += 2 * layer.out_lora_B @ layer.out_lora_A
    torch.testing.assert_close(model(x), reference(x))
    y = model(x)
    merge_adapters(model)
    torch.testing.assert_close(model(x), y)
    unmerge_adapters(model)
    torch.testing.assert_close(model.mha.in_proj_weight, base.mha.in_proj_weight)
    model(x).sum().backward()
    assert all(layer.get_parameter(n).grad.abs().max() > 0 for n in layer.adapter_parameter_names())
    assert layer.in_proj_weight.grad is None


@pytest.mark.parametrize(
    ("mha", "config", "message"),
    [
        (nn.MultiheadAttention(12, 3, kdim=6, vdim=6), {}, "separate q/k/v weights"),
        (nn.MultiheadAttention(12, 3), {"use_dora": True}, "DoRA is not supported on nn.Multi"),
        (nn.MultiheadAttention(12, 3), {"lora_bias": True}, "lora_bias is not supported on"),
        (nn.MultiheadAttention(12, 3), {"bias": "all"}, "bias='all' with an nn.MultiheadAtt"),
        (nn.MultiheadAttention(12, 3), {"init_lora_weights": "pissa"}, "pissa is not supported"),
    ],
    ids=["kdim", "dora", "lora_bias", "bias-all", "pissa"],
)
def test_refused_by_name_and_untouched(mha, config, message):
    model = nn.Sequential()
    model.add_module("mha", mha)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        inject_adapters(model, LoRAConfig(**{"r": 2, "target_modules": ["mha"], **config}))
    assert type(model.mha) is nn.MultiheadAttention
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
