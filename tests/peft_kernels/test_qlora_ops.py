"""The adapter-branch ops (``lora_delta``, ``dora_combine``, ``factored_weight_norm``) over a
base product computed elsewhere, against the float64 references of ``tests/reference.py``,
gradcheck, and their memory contract (no out×in tensor saved or built)."""

import pytest
import torch
import torch.nn.functional as F

from peft_kernels import (
    dora_combine,
    dora_weight_norm,
    factored_weight_norm,
    lora_delta,
    weight_row_sq_norm,
)
from peft_kernels.torch_linear import keep_mask
from tests.helpers.reference import make_inputs, max_rel_error, reference_with_grads
from tests.peft_kernels.test_memory import RecordNewTensors, saved_storages

TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-12}
BACKENDS = ["naive", "torch"]


@pytest.fixture(params=["eager", "custom-op"])
def path(request, monkeypatch):
    """Both ways the torch backend runs: ``autograd.Function`` eagerly, the custom ops (what
    ``torch.compile`` traces) when compiling; the latter forced here by ``is_compiling``."""
    if request.param == "custom-op":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    return request.param


def seeded_mask(seed: int, shape: tuple[int, ...], p: float) -> torch.Tensor:
    """The keep-mask ``lora_delta`` draws after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    drawn = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)
    return keep_mask(drawn, (int(torch.tensor(shape[:-1]).prod()), shape[-1]), p).view(shape)


def adapted(method, inputs, backend, p=0.0, keep=None):
    """The layer's composition: the base product from ``F.linear`` (standing in for the
    quantized layer), the branch and the combine from the ops under test."""
    x, w, b = inputs["x"], inputs["weight"], inputs["bias"]
    a, bb, s = inputs["lora_A"], inputs["lora_B"], inputs["scaling"]
    base = F.linear(x, w, b)
    if method == "lora":
        torch.manual_seed(5)  # lora_delta draws its dropout seed here (see seeded_mask)
        return base + lora_delta(x, a, bb, s, p, backend=backend)
    norm = dora_weight_norm(w, a, bb, s)
    if keep is None:
        return dora_combine(
            base,
            lora_delta(x, a, bb, s, backend=backend),
            inputs["magnitude"],
            norm,
            b,
            backend=backend,
        )
    x_dropped = x * keep.to(x.dtype) / (1 - p)
    delta = lora_delta(x_dropped, a, bb, s, backend=backend)
    return dora_combine(
        base, delta, inputs["magnitude"], norm, b, F.linear(x_dropped, w, b), backend=backend
    )


def check(method, inputs, backend, p=0.0):
    keep = seeded_mask(5, tuple(inputs["x"].shape), p) if p else None
    y = adapted(method, inputs, backend, p, keep)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    names = [k for k, v in inputs.items() if torch.is_tensor(v) and v.requires_grad]
    got = dict(zip(names, torch.autograd.grad(y, [inputs[k] for k in names], grad_y), strict=True))
    ref_y, ref_grads = reference_with_grads(method, inputs, grad_y, keep, p)
    tol = TOLERANCE[y.dtype]
    assert y.dtype == inputs["x"].dtype and max_rel_error(y, ref_y) < tol, "output"
    assert set(got) == set(ref_grads)
    for name, grad in got.items():
        assert grad.shape == inputs[name].shape and grad.dtype == inputs[name].dtype, name
        assert max_rel_error(grad, ref_grads[name]) < tol, f"grad of {name}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize(("rank", "bias", "batch"), [(1, True, None), (3, False, 2), (8, True, 3)])
def test_branch_and_combine_match_the_float64_reference(backend, method, rank, bias, batch, path):
    check(method, make_inputs(method, 13, 37, 29, rank, bias=bias, batch=batch), backend)


# The naive LoRA branch draws torch's own dropout mask; DoRA's dropout is applied by the layer.
@pytest.mark.parametrize(
    ("backend", "method"), [("torch", "lora"), ("torch", "dora"), ("naive", "dora")]
)
@pytest.mark.parametrize("bias", [True, False])
def test_with_dropout_match_the_float64_reference(backend, method, bias, path):
    check(method, make_inputs(method, 11, 26, 19, 3, bias=bias, batch=2), backend, p=0.3)


def test_float64_matches_to_rounding():
    for method in ("lora", "dora"):
        check(method, make_inputs(method, 9, 14, 10, 2, dtype=torch.float64), "torch")


def test_gradcheck_lora_delta(path):
    inputs = make_inputs("lora", 5, 7, 6, 2, dtype=torch.float64, batch=2)
    x, a, b = inputs["x"], inputs["lora_A"], inputs["lora_B"]

    def fn(x, a, b):
        torch.manual_seed(3)  # the same dropout mask on every call
        return lora_delta(x, a, b, 0.7, 0.25, backend="torch")

    assert torch.autograd.gradcheck(fn, (x, a, b))
    assert torch.autograd.gradcheck(lambda x, a, b: lora_delta(x, a, b, 1.3), (x, a, b))


@pytest.mark.parametrize("dropped", [False, True])
def test_gradcheck_dora_combine(dropped, path):
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    base, delta, magnitude, bias = rand(2, 3, 5), rand(2, 3, 5), rand(5), rand(5)
    norm = torch.rand(5, generator=gen, dtype=torch.float64) + 0.5
    inputs = (base, delta, magnitude, bias) + ((rand(2, 3, 5),) if dropped else ())

    def fn(base, delta, magnitude, bias, base_dropped=None):
        return dora_combine(base, delta, magnitude, norm, bias, base_dropped, backend="torch")

    assert torch.autograd.gradcheck(fn, inputs)


def test_factored_norm_from_the_products_equals_the_direct_norm():
    inputs = make_inputs("dora", 4, 33, 21, 5, dtype=torch.float64)
    w, a, b, s = inputs["weight"], inputs["lora_A"], inputs["lora_B"], inputs["scaling"]
    direct = torch.linalg.vector_norm(w + s * b @ a, dim=1)
    factored = factored_weight_norm(w @ a.T, weight_row_sq_norm(w), a, b, s)
    torch.testing.assert_close(factored, direct, rtol=1e-12, atol=0)
    assert not factored.requires_grad


def test_frozen_input_and_bias_get_no_gradient():
    inputs = make_inputs("dora", 6, 10, 8, 2)
    x = inputs["x"].detach()
    base = F.linear(x, inputs["weight"], inputs["bias"].detach())
    norm = dora_weight_norm(inputs["weight"], inputs["lora_A"], inputs["lora_B"], 0.5)
    delta = lora_delta(x, inputs["lora_A"], inputs["lora_B"], 0.5)
    dora_combine(base, delta, inputs["magnitude"], norm, inputs["bias"].detach()).sum().backward()
    assert all(inputs[k].grad is not None for k in ("lora_A", "lora_B", "magnitude"))


def test_bad_inputs_are_refused_by_name():
    inputs = make_inputs("dora", 4, 6, 5, 2)
    x, a, b, m = inputs["x"], inputs["lora_A"], inputs["lora_B"], inputs["magnitude"]
    with pytest.raises(ValueError, match="shapes do not fit"):
        lora_delta(x, a.T, b, 1.0)
    with pytest.raises(TypeError, match=r"lora_B has dtype torch\.float64"):
        lora_delta(x, a, b.double(), 1.0)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        lora_delta(x, a, b, 1.0, 1.0)
    y = torch.zeros(4, 5)
    with pytest.raises(ValueError, match="weight_norm must be detached"):
        dora_combine(y, y, m, m, None)
    with pytest.raises(ValueError, match=r"magnitude must be \(out,\) = \(5,\)"):
        dora_combine(y, y, m[:3], m[:3].detach(), None)
    with pytest.raises(ValueError, match="delta must have base's shape"):
        dora_combine(y, y[:2], m, m.detach(), None)


# -- memory -------------------------------------------------------------------------------------

M, IN, OUT, R = 33, 24, 20, 3


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_lora_delta_saves_x_u_and_the_mask_only(p, path):
    inputs = make_inputs("lora", M, IN, OUT, R)
    x, a, b = inputs["x"], inputs["lora_A"], inputs["lora_B"]
    saved = saved_storages(lambda: lora_delta(x, a, b, 0.5, p), [a, b])
    expected = [((M, IN), torch.float32), ((M, R), torch.float32)]
    if p:
        expected.append(((M, IN), torch.bool))
    assert sorted((s, str(d)) for s, d, _ in saved.values()) == sorted(
        (s, str(d)) for s, d in expected
    )
    assert x.untyped_storage().data_ptr() in saved  # x itself, not a copy


def test_dora_combine_saves_z_and_the_norm_only(path):
    inputs = make_inputs("dora", M, IN, OUT, R)
    base = torch.randn(M, OUT, requires_grad=True)
    delta = torch.randn(M, OUT, requires_grad=True)
    m, norm = inputs["magnitude"], torch.rand(OUT) + 1
    saved = saved_storages(lambda: dora_combine(base, delta, m, norm, inputs["bias"]), [m])
    assert sorted(s for s, _, _ in saved.values()) == [(OUT,), (M, OUT)]


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_no_out_by_in_tensor_is_ever_built(p):
    inputs = make_inputs("dora", M, IN, OUT, R)
    x, a, b = inputs["x"], inputs["lora_A"], inputs["lora_B"]
    base = torch.randn(M, OUT, requires_grad=True)
    norm = torch.rand(OUT) + 1
    recorder = RecordNewTensors()
    with recorder:
        y = dora_combine(base, lora_delta(x, a, b, 0.5, p), inputs["magnitude"], norm)
        y.backward(torch.ones_like(y))
    assert (OUT, IN) not in recorder.shapes and (IN, OUT) not in recorder.shapes


@pytest.mark.slow
def test_compiles_fullgraph_with_the_eager_results():
    inputs = make_inputs("dora", 5, 12, 10, 3)
    names = ("x", "lora_A", "lora_B", "magnitude")
    w, b = inputs["weight"], inputs["bias"].detach()

    def dora(x, a, bb, m):
        delta = lora_delta(x, a, bb, 0.5)
        return dora_combine(F.linear(x, w, b), delta, m, dora_weight_norm(w, a, bb, 0.5), b)

    args = [inputs[k] for k in names]
    eager = dora(*args)
    eager_grads = torch.autograd.grad(eager.sum(), args)
    compiled = torch.compile(dora, fullgraph=True)(*args)
    torch.testing.assert_close(compiled, eager)
    for name, got, want in zip(
        names, torch.autograd.grad(compiled.sum(), args), eager_grads, strict=True
    ):
        torch.testing.assert_close(got, want, msg=name)
