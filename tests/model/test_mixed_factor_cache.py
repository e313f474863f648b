"""The stacked factors of a mixed batch are kept while nothing is recorded (decoding): stacked
once per layer and batch, re-stacked after an in-place update, never kept under autograd."""

from __future__ import annotations

import pytest
import torch

import lightning_peft.methods.lora.linear as lora_linear
from lightning_peft import LoRAConfig, inject_adapters, set_active_adapters
from lightning_peft.model.mixed import mixed_batch
from tests.helpers.tiny_models import tiny_llama, tokens

ROWS = ["b", "a", "__base__", "b"]


@pytest.fixture
def model():
    torch.manual_seed(0)
    model = tiny_llama()
    for name, rank in (("a", 4), ("b", 2)):  # ranks that differ: the stack pads
        config = LoRAConfig(r=rank, lora_alpha=8, target_modules="all-linear")
        inject_adapters(model, config, name=name)
        with torch.no_grad():
            for key, parameter in model.named_parameters():
                if "lora_B" in key:
                    parameter.normal_(0, 0.1)
    set_active_adapters(model, ["a", "b"])
    return model.eval()


@pytest.fixture
def stacks(monkeypatch):
    """Counts the calls of ``pad_factors`` made by the linear layers."""
    calls = []
    original = lora_linear.pad_factors

    def counting(As, Bs):
        calls.append(len(As))
        return original(As, Bs)

    monkeypatch.setattr(lora_linear, "pad_factors", counting)
    return calls


def _fresh(model, ids):
    """The mixed forward in a batch of its own (a new cache)."""
    with torch.no_grad(), mixed_batch(model, ROWS):
        return model(input_ids=ids).logits


def test_no_grad_stacks_once_per_layer_and_follows_in_place_updates(model, stacks):
    ids = tokens(batch=len(ROWS), length=5)
    _fresh(model, ids)
    layers = len(stacks)  # stacks of one forward
    stacks.clear()
    with torch.no_grad(), mixed_batch(model, ROWS):
        first = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
        assert len(stacks) == layers  # the second forward reused every stack
        torch.testing.assert_close(again, first, rtol=0, atol=0)
        for key, parameter in model.named_parameters():
            if "named_adapters.b.lora_B" in key:
                parameter.mul_(3.0)  # in place: a new version, a new key
        updated = model(input_ids=ids).logits
    assert len(stacks) > layers
    torch.testing.assert_close(updated, _fresh(model, ids), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(updated, first)


def test_recording_never_reuses_a_stack(model, stacks):
    ids = tokens(batch=len(ROWS), length=5)
    model.train()
    with mixed_batch(model, ROWS):
        model(input_ids=ids).logits.sum().backward()
        per_forward = len(stacks)
        model(input_ids=ids).logits.sum().backward()
    assert per_forward > 0 and len(stacks) == 2 * per_forward
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
