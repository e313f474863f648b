"""Parity with the real ``peft`` LoRA and DoRA layers (weights copied in): outputs and grads."""

import math

import pytest
import torch

from peft_kernels.functional import _draw_seed
from tests.helpers.peft_layers import peft_linear
from tests.helpers.reference import (
    NEEDS_TRITON,
    call,
    grads_of,
    keep_mask_of,
    make_inputs,
    max_rel_error,
)

pytest.importorskip("peft")

NAMES = {
    "x": None,
    "bias": "base_layer.bias",
    "lora_A": "lora_A.default.weight",
    "lora_B": "lora_B.default.weight",
    "magnitude": "lora_magnitude_vector.default.weight",
}


def peft_grads(layer, names):
    params = dict(layer.named_parameters())
    return {name: params[NAMES[name]].grad for name in names if name != "x"}


@pytest.mark.parametrize(
    ("backend", "p"),
    [
        ("naive", 0.0),
        ("torch", 0.0),
        ("torch", 0.25),
        pytest.param("triton", 0.0, marks=NEEDS_TRITON),
        pytest.param("triton", 0.25, marks=NEEDS_TRITON),
    ],
)
@pytest.mark.parametrize(
    ("method", "use_rslora"), [("lora", False), ("lora", True), ("dora", False)]
)
def test_outputs_and_grads_equal_peft(backend, method, use_rslora, p):
    rank, alpha = 4, 12.0
    inputs = make_inputs(method, 19, 33, 27, rank, batch=2)
    inputs["scaling"] = alpha / (math.sqrt(rank) if use_rslora else rank)
    keep = None
    if p:  # peft gets the mask our backend will draw
        torch.manual_seed(3)
        keep = keep_mask_of(backend, _draw_seed(torch.device("cpu")), (38, 33), p).view(2, 19, 33)
    model, layer = peft_linear(
        inputs,
        use_dora=method == "dora",
        rank=rank,
        lora_alpha=alpha,
        use_rslora=use_rslora,
        keep=keep,
        p=p,
    )
    x_peft = inputs["x"].detach().clone().requires_grad_()
    y_peft = model(x_peft)
    grad_y = torch.randn(y_peft.shape, generator=torch.Generator().manual_seed(4))
    y_peft.backward(grad_y)

    torch.manual_seed(3)
    y = call(method, inputs, backend, p)
    grads = grads_of(y, inputs, grad_y)
    assert max_rel_error(y, y_peft.detach().double()) < 1e-5
    expected = peft_grads(layer, grads) | {"x": x_peft.grad}
    for name, grad in grads.items():
        assert max_rel_error(grad, expected[name].double()) < 1e-5, name
