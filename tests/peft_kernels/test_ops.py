"""Every backend against the float64 reference: outputs and every gradient."""

import pytest
import torch

from tests.helpers.reference import (
    NEEDS_TRITON,
    call,
    grads_of,
    keep_mask_of,
    make_inputs,
    max_rel_error,
    reference_with_grads,
)

BACKENDS = ["naive", "torch", pytest.param("triton", marks=NEEDS_TRITON)]
# Scale-free error bounds per dtype: a few hundred ulps of the accumulation length used here.
TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-12}


def check_against_reference(method, inputs, backend, p=0.0, keep=None):
    y = call(method, inputs, backend, p)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    got = grads_of(y, inputs, grad_y)
    ref_y, ref_grads = reference_with_grads(method, inputs, grad_y, keep, p)
    tol = TOLERANCE[y.dtype]
    assert y.dtype == inputs["x"].dtype and y.shape == ref_y.shape
    assert max_rel_error(y, ref_y) < tol, "output"
    assert set(got) == set(ref_grads)
    for name, grad in got.items():
        assert grad.dtype == inputs[name].dtype and grad.shape == inputs[name].shape, name
        assert max_rel_error(grad, ref_grads[name]) < tol, f"grad of {name}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("rank", [1, 3, 8])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference_2d(backend, method, rank, bias):
    inputs = make_inputs(method, 37, 70, 45, rank, bias=bias)
    check_against_reference(method, inputs, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_matches_reference_3d_wide_output(backend, method):
    inputs = make_inputs(method, 13, 40, 83, 5, batch=3)
    check_against_reference(method, inputs, backend)


@pytest.mark.parametrize("backend", ["naive", "torch"])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_matches_reference_float64(backend, method):
    inputs = make_inputs(method, 21, 30, 17, 4, dtype=torch.float64, batch=2)
    check_against_reference(method, inputs, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_frozen_bias_and_input_get_no_grad(backend, method):
    inputs = make_inputs(method, 9, 20, 11, 2)
    inputs["x"].requires_grad_(False)
    inputs["bias"].requires_grad_(False)
    y = call(method, inputs, backend)
    y.sum().backward()
    assert inputs["x"].grad is None and inputs["bias"].grad is None
    assert inputs["lora_A"].grad is not None and inputs["lora_B"].grad is not None
    if method == "dora":
        assert inputs["magnitude"].grad is not None


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_zero_lora_B_gives_base_layer(method):
    """B = 0 at init: LoRA is the frozen linear; DoRA with m = ‖W‖_row too."""
    inputs = make_inputs(method, 10, 24, 12, 4)
    with torch.no_grad():
        inputs["lora_B"].zero_()
        if method == "dora":
            inputs["magnitude"].copy_(torch.linalg.vector_norm(inputs["weight"], dim=1))
    expected = torch.nn.functional.linear(inputs["x"], inputs["weight"], inputs["bias"])
    torch.testing.assert_close(call(method, inputs, "torch"), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_low_precision_error_is_that_of_plain_torch(dtype, method):
    """Error against the fp32-input reference at most ~2x that of plain torch in ``dtype``."""
    inputs32 = make_inputs(method, 64, 96, 80, 8)
    low = {
        k: (v.detach().to(dtype).requires_grad_(v.requires_grad) if torch.is_tensor(v) else v)
        for k, v in inputs32.items()
    }
    grad_y = torch.randn(64, 80, generator=torch.Generator().manual_seed(2))
    ref_y, ref_grads = reference_with_grads(method, inputs32, grad_y)
    for backend_pair in [("torch", "naive")]:
        ours, plain = (call(method, low, b) for b in backend_pair)
        ours_grads = grads_of(ours, low, grad_y.to(dtype))
        plain_grads = grads_of(plain, low, grad_y.to(dtype))
        assert max_rel_error(ours, ref_y) <= 2 * max_rel_error(plain, ref_y) + 1e-3
        for name in ref_grads:
            ours_err = max_rel_error(ours_grads[name], ref_grads[name])
            plain_err = max_rel_error(plain_grads[name], ref_grads[name])
            assert ours_err <= 2 * plain_err + 1e-3, name


def test_gradcheck_torch_lora_float64():
    inputs = make_inputs("lora", 6, 7, 5, 2, dtype=torch.float64, batch=2)
    args = [inputs[k] for k in ("x", "weight", "bias", "lora_A", "lora_B")]

    def fn(x, weight, bias, lora_A, lora_B):
        from peft_kernels import lora_linear

        return lora_linear(x, weight, bias, lora_A, lora_B, 0.5, backend="torch")

    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("path", ["eager", "custom_op"])
@pytest.mark.parametrize("p", [0.0, 0.4])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_gradcheck_torch_ops_float64(method, p, path):
    """gradcheck both ways into the torch backend, the seed (and DoRA's norm) held fixed."""
    from peft_kernels import dora_weight_norm, ops

    inputs = make_inputs(method, 6, 7, 5, 2, dtype=torch.float64)
    x, w, b, a, bb = (inputs[k] for k in ("x", "weight", "bias", "lora_A", "lora_B"))
    seed = torch.tensor([1234]) if p else None
    norm = dora_weight_norm(w, a, bb, 0.5) if method == "dora" else None

    def fn(x, b, a, bb, m=None):
        if path == "eager":
            return ops.adapter_linear(
                x, w, b, a, bb, m, norm, scaling=0.5, dropout_p=p, seed=seed, backend="torch"
            )
        return ops.adapter_linear_op(x, w, b, a, bb, m, norm, 0.5, p, seed, "torch")[0]

    args = (x, b, a, bb) + ((inputs["magnitude"],) if method == "dora" else ())
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=NEEDS_TRITON)])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_float32_adapters_on_bf16_base_are_as_accurate_as_peft_math(method, backend, p):
    """bf16 x, W, b with float32 A, B, m: every output within 2x the error of the peft-like
    ``naive`` path (adapter branch in float32) against float64 on exactly the same values."""
    inputs = make_inputs(method, 37, 70, 45, 8)
    for name in ("x", "weight", "bias"):  # bf16 base: its values are exact in the reference
        inputs[name] = inputs[name].detach().bfloat16().requires_grad_(inputs[name].requires_grad)
    exact = {
        k: (v.detach().double().requires_grad_(v.requires_grad) if torch.is_tensor(v) else v)
        for k, v in inputs.items()
    }
    grad_y = torch.randn(37, 45, generator=torch.Generator().manual_seed(3)).bfloat16()

    def run(backend_name, values):
        torch.manual_seed(11)  # the same dropout mask for every backend of one kind
        y = call(method, values, backend_name, p)
        return y, grads_of(y, values, grad_y.to(y.dtype))

    keep = None
    if p:
        from peft_kernels.functional import _draw_seed

        torch.manual_seed(11)
        keep = keep_mask_of(backend, _draw_seed(torch.device("cpu")), (37, 70), p)
    ref_y, ref_grads = reference_with_grads(method, exact, grad_y.double(), keep, p)
    y, grads = run(backend, inputs)
    assert y.dtype == torch.bfloat16
    for name in ("lora_A", "lora_B", "magnitude"):
        if name in grads:
            assert grads[name].dtype == torch.float32, name
    if p:  # naive draws its own mask: compare with the reference's bound instead
        assert max_rel_error(y, ref_y) < 1e-2
        for name, grad in grads.items():
            assert max_rel_error(grad, ref_grads[name]) < 1e-2, name
        return
    naive_y, naive_grads = run("naive", inputs)
    assert max_rel_error(y, ref_y) <= 2 * max_rel_error(naive_y, ref_y) + 1e-6
    for name, grad in grads.items():
        ours = max_rel_error(grad, ref_grads[name])
        assert ours <= 2 * max_rel_error(naive_grads[name], ref_grads[name]) + 1e-6, name


@pytest.mark.parametrize("bias", [True, False])
def test_dora_magnitude_gradient_where_magnitude_is_zero(bias):
    """Without dropout the torch backend recovers base from y: ``grad_m = Σ g ⊙ (y − b) / m``.
    Columns with m ≈ 0 (y holds nothing of base there) recompute their base column instead."""
    inputs = make_inputs("dora", 37, 70, 45, 3, bias=bias)
    with torch.no_grad():
        inputs["magnitude"][[0, 7, 44]] = 0.0
        inputs["magnitude"][3] = 1e-6
    check_against_reference("dora", inputs, "torch")


def test_dora_output_modified_in_place_is_an_error_not_a_wrong_gradient():
    """The torch backend keeps y for grad_m: an in-place change of y must raise in backward."""
    inputs = make_inputs("dora", 9, 20, 11, 2)
    y = call("dora", inputs, "torch")
    y.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("case", ["lora", "dora_dropout", "delta_dropout", "combine", "dropped"])
def test_custom_ops_pass_opcheck(case):
    """Every op dual_op builds: schema, fake tensors and autograd registration agree."""
    from peft_kernels import adapter_branch, dora_weight_norm, ops

    inputs = make_inputs("dora", 5, 7, 6, 3, dtype=torch.float64)
    x, w, b, a, bb, m = (
        inputs[k] for k in ("x", "weight", "bias", "lora_A", "lora_B", "magnitude")
    )
    norm, seed = dora_weight_norm(w, a.detach(), bb.detach(), 0.5), torch.tensor([7])
    base, delta = (torch.randn(5, 6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    op, args = {
        "lora": (ops.adapter_linear, (x, w, b, a, bb, None, None, 0.5, 0.0, None, "torch")),
        "dora_dropout": (ops.adapter_linear, (x, w, None, a, bb, m, norm, 0.5, 0.3, seed, "torch")),
        "delta_dropout": (adapter_branch._lora_delta, (x, a, bb, 0.5, 0.2, seed)),
        "combine": (adapter_branch._dora_combine, (base, delta, m, norm, b, None)),
        "dropped": (adapter_branch._dora_combine, (base, delta, m, norm, b, base.detach() * 2)),
    }[case]
    torch.library.opcheck(op.op, args)
