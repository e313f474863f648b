"""``lora_bias`` (peft's ``LoraConfig`` field: a trainable bias on B, ``y += s·b_B``) on every
layer type peft gives it to, against the real peft; peft's refusals, by name."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from lightning_peft import LoRAConfig, inject_adapters, save_adapter
from lightning_peft.peft_format.files import read_config
from tests.helpers.peft_interop import check_against_peft
from tests.helpers.tiny_models import tiny_gpt2, tokens

peft = pytest.importorskip("peft")


class Layers(nn.Module):
    """A Linear with a bias, one without, Conv1d, a grouped Conv2d and a Conv3d."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(7, 6)
        self.lin_nobias = nn.Linear(6, 4, bias=False)
        self.conv1 = nn.Conv1d(4, 4, 2)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.conv3 = nn.Conv3d(6, 2, 2)

    def forward(self, x):  # x (N, 5, 7)
        h = torch.tanh(self.lin_nobias(torch.tanh(self.lin(x))))  # (N, 5, 4)
        h = torch.tanh(self.conv1(h.transpose(1, 2)))  # (N, 4, 4)
        h = torch.tanh(self.conv2(h.reshape(-1, 4, 2, 2)))  # (N, 6, 2, 2)
        return self.conv3(h.reshape(-1, 6, 2, 2, 1).expand(-1, 6, 2, 2, 2))


X = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "targets",
    [["lin"], ["lin_nobias"], ["conv1"], ["conv2"], ["conv3"], ["lin", "conv1", "conv3"]],
    ids=lambda t: "+".join(t),
)
def test_lora_bias_matches_peft_both_ways(targets, tmp_path):
    """lin_nobias and the grouped conv2 do not merge; both packages refuse it."""
    kwargs = {"r": 2, "lora_alpha": 7, "target_modules": targets, "lora_bias": True}
    result = check_against_peft(Layers, X, kwargs, tmp_path)
    print(f"\n{'+'.join(targets)}: {result}")


def test_lora_bias_on_transformers_conv1d_matches_peft(tmp_path):
    class Logits(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = tiny_gpt2()

        def forward(self, ids):
            return self.model(input_ids=ids).logits

    kwargs = {"r": 2, "lora_alpha": 16, "target_modules": ["c_attn"], "lora_bias": True}
    result = check_against_peft(Logits, tokens(), kwargs, tmp_path)
    print(f"\ngpt2 c_attn: {result}")


def test_starts_at_zero_and_trains_as_a_scaled_bias(tmp_path):
    base = Layers()
    model = copy.deepcopy(base)
    config = LoRAConfig(r=2, lora_alpha=6, target_modules=["lin", "conv2"], lora_bias=True)
    inject_adapters(model, config)
    torch.testing.assert_close(model(X), base(X))
    assert model.lin.lora_bias.abs().max() == 0 and model.lin.lora_bias.requires_grad
    grad_out = torch.randn_like(model(X))
    model(X).backward(grad_out)
    # y = conv(x, W) + b + s·(B(A(x)) + b_B): b_B's gradient is s times b's
    base_model = copy.deepcopy(base)
    base_model.conv2.bias.requires_grad_(True)
    base_model(X).backward(grad_out)
    torch.testing.assert_close(model.conv2.lora_bias.grad, 3.0 * base_model.conv2.bias.grad)
    save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["lora_bias"] is True and read_config(tmp_path).lora_bias is True


def test_peft_config_with_lora_bias_carries_over():
    theirs = peft.LoraConfig(r=4, target_modules=["lin"], lora_bias=True)
    ours = LoRAConfig(**theirs.to_dict())
    assert ours.lora_bias is True and ours.to_dict()["lora_bias"] is True


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"use_dora": True}, "not supported with DoRA"),
        ({"init_lora_weights": "gaussian"}, "only supported with init_lora_weights=True or False"),
        ({"init_lora_weights": "pissa"}, "only supported with init_lora_weights=True or False"),
        ({"lora_bias": "yes"}, "lora_bias must be True or False"),
    ],
)
def test_peft_s_config_rules(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRAConfig(**{"target_modules": ["lin"], "lora_bias": True, **kwargs})
    if kwargs.get("lora_bias") is None:  # peft refuses the same combinations
        with pytest.raises(ValueError):
            peft.LoraConfig(**{"target_modules": ["lin"], "lora_bias": True, **kwargs})
