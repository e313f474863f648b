"""Dropout: seeded, reproducible, and the backward uses the forward's mask."""

import pytest
import torch

from peft_kernels import torch_linear
from peft_kernels.functional import _draw_seed
from tests.helpers.reference import (
    NEEDS_TRITON,
    call,
    grads_of,
    keep_mask_of,
    make_inputs,
    max_rel_error,
    reference_with_grads,
)

BACKENDS = ["torch", pytest.param("triton", marks=NEEDS_TRITON)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_dropout_matches_reference_with_the_same_mask(backend, method):
    p = 0.3
    inputs = make_inputs(method, 37, 70, 45, 3, batch=None)
    torch.manual_seed(7)
    y = call(method, inputs, backend, p)
    torch.manual_seed(7)
    keep = keep_mask_of(backend, _draw_seed(torch.device("cpu")), (37, 70), p)
    assert 0.5 < keep.float().mean() < 0.9  # a real mask, neither all nor nothing kept
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    got = grads_of(y, inputs, grad_y)
    ref_y, ref_grads = reference_with_grads(method, inputs, grad_y, keep, p)
    assert max_rel_error(y, ref_y) < 2e-5
    for name, grad in got.items():  # backward regenerated / kept exactly the forward's mask
        assert max_rel_error(grad, ref_grads[name]) < 2e-5, name


@pytest.mark.parametrize("backend", ["naive", *BACKENDS])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_same_seed_same_output_other_seed_other_output(backend, method):
    inputs = make_inputs(method, 12, 20, 9, 2)
    outputs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        outputs.append(call(method, inputs, backend, 0.5).detach())
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    assert not torch.allclose(outputs[0], outputs[2])


@pytest.mark.parametrize("backend", ["naive", *BACKENDS])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_no_dropout_when_p_is_zero_or_not_training(backend, method):
    inputs = make_inputs(method, 12, 20, 9, 2, batch=2)
    plain = call(method, inputs, backend, 0.0)
    torch.testing.assert_close(call(method, inputs, backend, 0.5, training=False), plain)
    torch.testing.assert_close(call(method, inputs, backend, 0.0, training=True), plain)


def test_keep_fraction_is_one_minus_p():
    keep = torch_linear.keep_mask(torch.tensor([11]), (300, 200), 0.25)
    assert abs(keep.float().mean().item() - 0.75) < 0.01
