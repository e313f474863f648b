"""The stacked factors of a mixed batch are kept on each layer while nothing is recorded
(inference, decoding): stacked once for a run of batches, again after an in-place update or a
new storage, never kept while autograd records."""

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
    """Counts the stacks the linear layers make."""
    calls = []
    original = lora_linear._stack_factors

    def counting(layers, device):
        calls.append(len(layers))
        return original(layers, device)

    monkeypatch.setattr(lora_linear, "_stack_factors", counting)
    return calls


def _mixed(model, ids):
    with torch.no_grad(), mixed_batch(model, ROWS):
        return model(input_ids=ids).logits


def _per_row(model, ids):
    """Each row alone with its adapter active (no mixed batch): the reference."""
    outputs = []
    for row, name in enumerate(ROWS):
        with torch.no_grad():
            if name == "__base__":
                with lora_linear_disabled(model):
                    outputs.append(model(input_ids=ids[row : row + 1]).logits)
                continue
            set_active_adapters(model, [name])
            outputs.append(model(input_ids=ids[row : row + 1]).logits)
    set_active_adapters(model, ["a", "b"])
    return torch.cat(outputs)


def lora_linear_disabled(model):
    from lightning_peft import disable_adapters

    return disable_adapters(model)


def test_no_grad_stacks_once_per_layer_across_batches(model, stacks):
    ids = tokens(batch=len(ROWS), length=5)
    first = _mixed(model, ids)
    layers = len(stacks)
    assert layers > 0
    with torch.no_grad(), mixed_batch(model, ROWS):  # a batch of its own, then a second call
        again = model(input_ids=ids).logits
        again_2 = model(input_ids=ids).logits
    assert len(stacks) == layers  # every stack reused
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    torch.testing.assert_close(again_2, first, rtol=0, atol=0)
    torch.testing.assert_close(first, _per_row(model, ids), rtol=1e-5, atol=1e-6)


def test_an_in_place_update_or_new_storage_stacks_again(model, stacks):
    ids = tokens(batch=len(ROWS), length=5)
    first = _mixed(model, ids)
    layers = len(stacks)
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            if "named_adapters.b.lora_B" in key:
                parameter.mul_(3.0)  # in place: a new version
    updated = _mixed(model, ids)
    assert len(stacks) == 2 * layers
    assert not torch.allclose(updated, first)
    torch.testing.assert_close(updated, _per_row(model, ids), rtol=1e-5, atol=1e-6)
    for key, parameter in model.named_parameters():
        if "named_adapters.b.lora_A" in key:  # what .to() does: a new storage under .data
            parameter.data = parameter.data * 2.0
    swapped = _mixed(model, ids)
    assert len(stacks) == 3 * layers
    assert not torch.allclose(swapped, updated)
    torch.testing.assert_close(swapped, _per_row(model, ids), rtol=1e-5, atol=1e-6)


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


@pytest.mark.parametrize(
    "rows",
    [["a", "a", "b", "__base__"], ["b", "__base__", "a", "b"]],
    ids=["in_adapter_order", "shuffled"],
)
def test_mixed_gradients_equal_each_adapter_on_its_own_rows(model, rows):
    """Rows already in adapter order skip the gather and scatter (``grouping`` gives rows None);
    either way each adapter's gradient is the one its rows give it alone."""
    ids = tokens(batch=len(rows), length=5)
    weights = torch.randn(len(rows), 5, 64, generator=torch.Generator().manual_seed(4))
    model.train()
    with mixed_batch(model, rows):
        (model(input_ids=ids).logits * weights).sum().backward()
    mixed = {key: p.grad.clone() for key, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    for name in ("a", "b"):
        picked = [i for i, row in enumerate(rows) if row == name]
        set_active_adapters(model, [name])
        (model(input_ids=ids[picked]).logits * weights[picked]).sum().backward()
    set_active_adapters(model, ["a", "b"])
    alone = {key: p.grad for key, p in model.named_parameters() if p.grad is not None}
    assert mixed.keys() == alone.keys() and len(mixed) == 2 * 2 * 14  # A, B; 2 adapters
    for key, grad in mixed.items():
        scale = alone[key].abs().max().item()  # fp32 sums in another order: relative to it
        torch.testing.assert_close(grad, alone[key], rtol=1e-4, atol=1e-5 * scale, msg=key)
