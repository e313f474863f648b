"""Hugging Face hub kernels (transformers >= 5.25 ``use_kernels``, on by default) and adapters.

``from_pretrained`` calls ``kernelize``, which replaces the ``forward`` of modules whose class a
hub kernel is registered for (on a GPU, for Llama: RMSNorm, the rotary embedding, activations at
inference). Offline on the CPU nothing is replaced. A hub kernel that replaced the forward of a
module *holding* adapted layers and read their weights directly would bypass the adapters: the
callback's first-step gradient check must name them.
"""

from __future__ import annotations

import warnings
from types import MethodType

import pytest
import torch
import torch.nn.functional as F

from lightning_peft import LoRAConfig, PEFTCallback
from lightning_peft.core.errors import InputError
from tests.helpers.lightning_modules import PlainCausalLM, quiet_trainer
from tests.helpers.tiny_models import tiny_llama


def test_from_pretrained_with_hub_kernels_on_leaves_the_model_as_it_is_offline_on_cpu(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)  # transformers' default: on
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path)
    default = AutoModelForCausalLM.from_pretrained(tmp_path)  # use_kernels as transformers picks
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, use_kernels=False)
    replaced = [name for name, m in default.named_modules() if "forward" in vars(m)]
    assert replaced == []
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(default(ids).logits, plain(ids).logits, rtol=0, atol=0)


def _fused_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """What a fused SwiGLU hub kernel does: the projections' weights read directly, so the
    adapted ``gate_proj``/``up_proj``/``down_proj`` modules' forwards never run."""
    gate = F.linear(x, self.gate_proj.weight)
    return F.linear(F.silu(gate) * F.linear(x, self.up_proj.weight), self.down_proj.weight)


class KernelizedMLPCausalLM(PlainCausalLM):
    """The tiny Llama with every MLP's forward replaced as ``kernels.kernelize`` replaces one
    (a bound method set on the instance)."""

    def build_model(self):
        model = super().build_model()
        for layer in model.model.layers:
            layer.mlp.forward = MethodType(_fused_mlp_forward, layer.mlp)
        return model


def test_adapters_a_hub_kernel_bypasses_are_named_after_the_first_step(tmp_path):
    config = LoRAConfig(r=2, target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"])
    module = KernelizedMLPCausalLM()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        quiet_trainer(tmp_path, [PEFTCallback(config, verbose=False)], 2).fit(module)
    (message,) = [str(w.message) for w in record if "received no gradient" in str(w.message)]
    assert "6 of the 8 adapters received no gradient in the first step" in message
    assert "model.model.layers.0.mlp.gate_proj" in message and "q_proj" not in message


def test_when_a_hub_kernel_bypasses_every_adapter_training_stops_before_an_update(tmp_path):
    config = LoRAConfig(
        r=2, target_modules=["gate_proj", "up_proj", "down_proj"], modules_to_save=["lm_head"]
    )
    module = KernelizedMLPCausalLM()
    run = quiet_trainer(tmp_path, [PEFTCallback(config, verbose=False)], 2)
    with pytest.raises(InputError, match=r"none of the 6 adapters received a gradient"):
        run.fit(module)
    assert run.global_step == 0


def test_when_the_loss_reaches_no_trained_tensor_training_stops_with_a_named_cause(tmp_path):
    """Every adapter bypassed and nothing else trained: torch's backward would fail with
    "element 0 of tensors does not require grad"; the callback names the cause first."""
    config = LoRAConfig(r=2, target_modules=["gate_proj", "up_proj", "down_proj"])
    module = KernelizedMLPCausalLM()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    run = quiet_trainer(tmp_path, [PEFTCallback(config, verbose=False)], 2)
    with pytest.raises(InputError, match=r"the loss does not depend on any trained tensor"):
        run.fit(module)
    assert run.global_step == 0
    after = module.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k in after)
