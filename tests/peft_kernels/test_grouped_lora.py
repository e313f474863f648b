"""``grouped_lora_delta`` / ``mixed_lora_linear`` / ``group_rows`` / ``pad_factors`` against an
independent float64 reference written here as a per-row loop (gradients by autograd on it)."""

from __future__ import annotations

import pytest
import torch

from peft_kernels import (
    group_rows,
    grouped_lora_delta,
    lora_linear,
    mixed_lora_linear,
    pad_factors,
)
from peft_kernels.backends import triton_interpreted
from tests.helpers.reference import NEEDS_TRITON

BACKENDS = ["naive", "torch", pytest.param("triton", marks=NEEDS_TRITON)]


# -- the reference ------------------------------------------------------------------------------


def reference_delta(x, As, Bs, scaling, ends, rows):
    """Per ordered row j: find its group from the ends, ``s_k·B_k (A_k x[rows[j]])``; float64.

    ``As`` / ``Bs`` are lists of per-group factors (each its own rank); ``ends`` and ``rows``
    python lists (rows None: 0..N-1). Returns (M, out).
    """
    rows = list(range(x.shape[0])) if rows is None else rows
    out_features = Bs[0].shape[0]
    result = []
    for j, row in enumerate(rows):
        group = next((k for k, end in enumerate(ends) if j < end), None)
        if group is None:
            result.append(x.new_zeros(out_features))
        else:
            result.append(scaling[group] * (Bs[group] @ (As[group] @ x[row])))
    # zero terms that connect every input to the output: unused inputs get zero gradients
    connect = 0 * (x.sum() + sum(a.sum() for a in As) + sum(b.sum() for b in Bs))
    return (torch.stack(result) if result else x.new_zeros(0, out_features)) + connect


def _leaves64(*tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


def _rand(gen, *shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def make_case(n, in_f, out_f, r, ends, rows=None, dtype=torch.float32, factor_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = len(ends)
    factor_dtype = factor_dtype or dtype
    return {
        "x": _rand(gen, n, in_f, dtype=dtype).requires_grad_(),
        "lora_A": _rand(gen, k, r, in_f, scale=in_f**-0.5, dtype=factor_dtype).requires_grad_(),
        "lora_B": _rand(gen, k, out_f, r, scale=0.5, dtype=factor_dtype).requires_grad_(),
        "scaling": torch.linspace(0.5, 2.0, k),
        "offsets": torch.tensor(ends, dtype=torch.int64),
        "rows": None if rows is None else torch.tensor(rows, dtype=torch.int64),
    }


def check_against_reference(case, backend, rtol=1e-5):
    """Forward and the three gradients of the op against the float64 per-row reference."""
    x, A, B = case["x"], case["lora_A"], case["lora_B"]
    gen = torch.Generator().manual_seed(1)
    delta = grouped_lora_delta(
        x, A, B, case["scaling"], case["offsets"], case["rows"], backend=backend
    )
    grad = torch.randn(delta.shape, generator=gen, dtype=torch.float64)
    delta.backward(grad.to(delta.dtype))

    x64, A64, B64 = _leaves64(x, A, B)
    ends = case["offsets"].tolist()
    rows = None if case["rows"] is None else case["rows"].tolist()
    ref = reference_delta(x64, list(A64), list(B64), case["scaling"].double(), ends, rows)
    ref.backward(grad)
    assert delta.dtype == x.dtype and delta.shape == ref.shape
    for got, want in ((delta, ref), (x.grad, x64.grad), (A.grad, A64.grad), (B.grad, B64.grad)):
        scale = max(want.abs().max().item(), 1.0) if want.numel() else 1.0
        torch.testing.assert_close(got.double(), want, rtol=0, atol=rtol * scale)


# -- forward and gradients ----------------------------------------------------------------------

CASES = {
    # name: (n, in, out, r, ends, rows)
    "in_order": (9, 13, 11, 3, [4, 9], None),
    "empty_groups": (10, 13, 11, 3, [0, 3, 3, 8, 10], None),
    "tail_without_group": (10, 13, 11, 3, [2, 6], None),
    "rows_unsorted_repeats": (6, 13, 11, 3, [3, 5, 9], [4, 0, 4, 2, 5, 1, 0, 3, 2]),
    "top2_same_row_two_groups": (4, 7, 5, 2, [4, 8], [0, 1, 2, 3, 3, 2, 1, 0]),
    "K1": (5, 13, 11, 4, [5], None),
    "one_row": (1, 13, 11, 3, [0, 1], None),
    "M0": (3, 13, 11, 3, [0, 0], []),
    "N0": (0, 13, 11, 3, [0, 0], None),
    "r1": (7, 13, 11, 1, [2, 7], None),
    "odd_sizes": (37, 33, 35, 5, [1, 17, 30], None),
    # groups of one size: the torch backend's batched path (uniform_size)
    "uniform_rows_unsorted": (8, 13, 11, 3, [2, 4, 6, 8], [7, 0, 5, 2, 3, 6, 1, 4]),
    "uniform_tail_without_group": (10, 13, 11, 3, [3, 6], None),
    # in, out, r multiples of 16 bytes: the torch backend's grouped-GEMM path (torch._grouped_mm)
    "gmm_rows_repeats_tail": (6, 16, 12, 4, [3, 3, 7, 9], [4, 0, 4, 2, 5, 1, 0, 3, 2, 5]),
    "gmm_empty_first_tail": (10, 16, 20, 8, [0, 4, 4, 7], None),
}
GROUPED_MM_CASES = [name for name in CASES if name.startswith("gmm_")]


@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, case_name):
    n, in_f, out_f, r, ends, rows = CASES[case_name]
    check_against_reference(make_case(n, in_f, out_f, r, ends, rows), backend)


@pytest.mark.parametrize("case_name", GROUPED_MM_CASES)
def test_torch_backend_grouped_mm_path_taken(case_name):
    """The gmm_ cases run as grouped GEMMs where this torch has them (else the loop): the
    reference test above then checks that path."""
    from peft_kernels import torch_grouped

    n, in_f, out_f, r, ends, rows = CASES[case_name]
    case = make_case(n, in_f, out_f, r, ends, rows)
    n_ordered = n if rows is None else len(rows)
    taken = torch_grouped._use_grouped_mm(
        case["x"], case["lora_A"], case["lora_B"], torch.float32, n_ordered
    )
    assert taken == torch_grouped.grouped_mm_runs("cpu")
    assert not torch_grouped._use_grouped_mm(
        case["x"].double(), case["lora_A"].double(), case["lora_B"].double(), torch.float64, n
    )


@pytest.mark.parametrize("case_name", ["gmm_rows_repeats_tail", "rows_unsorted_repeats"])
def test_torch_backend_strided_b_gradient_in_b_layout(case_name):
    """B given as a permuted view (E, out, r) of an (out, r, E) tensor, as LoRA on experts passes
    it: same values as the reference, and dB arrives with B's strides (the base's layout)."""
    n, in_f, out_f, r, ends, rows = CASES[case_name]
    case = make_case(n, in_f, out_f, r, ends, rows)
    base = case["lora_B"].detach().permute(1, 2, 0).contiguous().requires_grad_()  # (out, r, E)
    strided = base.permute(2, 0, 1)
    args = (case["x"], case["lora_A"], strided, case["scaling"], case["offsets"], case["rows"])
    delta = grouped_lora_delta(*args, backend="torch")
    delta.square().sum().backward()
    contiguous = case["lora_B"].detach().requires_grad_()
    args = (case["x"].detach(), case["lora_A"].detach(), contiguous, *args[3:])
    want = grouped_lora_delta(*args, backend="torch")
    want.square().sum().backward()
    torch.testing.assert_close(delta, want, rtol=0, atol=0)
    torch.testing.assert_close(base.grad.permute(2, 0, 1), contiguous.grad, rtol=1e-6, atol=1e-6)
    assert base.grad.stride() == base.stride()


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_gradcheck_float64(backend):
    case = make_case(6, 5, 4, 2, [3, 3, 7], [5, 0, 1, 0, 3, 2, 4, 1], dtype=torch.float64)

    def fn(x, lora_A, lora_B):
        return grouped_lora_delta(
            x, lora_A, lora_B, case["scaling"].double(), case["offsets"], case["rows"],
            backend=backend,
        )  # fmt: skip

    assert torch.autograd.gradcheck(fn, (case["x"], case["lora_A"], case["lora_B"]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_some_inputs_require_grad(backend):
    case = make_case(6, 9, 7, 2, [2, 6], [5, 1, 1, 0, 3, 2])
    case["x"].requires_grad_(False)
    case["lora_A"].requires_grad_(False)
    delta = grouped_lora_delta(*case.values(), backend=backend)
    delta.sum().backward()
    B64 = case["lora_B"].detach().double().requires_grad_()
    ref = reference_delta(
        case["x"].double(), list(case["lora_A"].double()), list(B64), case["scaling"].double(),
        [2, 6], case["rows"].tolist(),
    )  # fmt: skip
    ref.sum().backward()
    torch.testing.assert_close(case["lora_B"].grad.double(), B64.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ends", [[5, 5, 19, 24], [6, 12, 18, 24]], ids=["ragged", "uniform"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_x_with_float32_factors(backend, ends):
    """bf16 x, fp32 factors: fp32 math, one rounding to bf16; the error against float64 is at
    most ~2x that of rounding the exact result to bf16 (4x for the Triton interpreter, which
    rounds fp32 -> bf16 toward zero, as tests/peft_kernels/test_triton_linear.py notes)."""
    case = make_case(24, 40, 24, 4, ends, None, dtype=torch.bfloat16,
                     factor_dtype=torch.float32)  # fmt: skip
    x, A, B = case["x"], case["lora_A"], case["lora_B"]
    delta = grouped_lora_delta(*case.values(), backend=backend)
    assert delta.dtype == torch.bfloat16
    grad = torch.randn(delta.shape, generator=torch.Generator().manual_seed(2))
    delta.backward(grad.to(torch.bfloat16))
    assert x.grad.dtype == torch.bfloat16 and A.grad.dtype == torch.float32
    x64, A64, B64 = _leaves64(x, A, B)
    ref = reference_delta(x64, list(A64), list(B64), case["scaling"].double(), ends, None)
    ref.backward(grad.to(torch.bfloat16).double())
    for got, want in ((delta, ref), (x.grad, x64.grad)):
        rounding = (want.to(torch.bfloat16).double() - want).abs().max()
        factor = 4 if backend == "triton" and triton_interpreted() else 2
        assert (got.double() - want).abs().max() <= factor * rounding + 1e-6
    for got, want in ((A.grad, A64.grad), (B.grad, B64.grad)):  # fp32 math on exact bf16 inputs
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_bf16_grouped_mm_path_within_twice_plain_bf16_error():
    """All-bf16, ragged groups, sizes multiples of 16 bytes (the torch backend's grouped-GEMM
    path): its error against float64 is at most ~2x that of the plain-autograd bf16 loop."""
    ends, rows = [5, 5, 19, 24], [(7 * j) % 20 for j in range(26)]
    errors = {}
    for backend in ("naive", "torch"):
        case = make_case(20, 40, 24, 8, ends, rows, dtype=torch.bfloat16)
        x, A, B = case["x"], case["lora_A"], case["lora_B"]
        delta = grouped_lora_delta(*case.values(), backend=backend)
        grad = torch.randn(delta.shape, generator=torch.Generator().manual_seed(2))
        delta.backward(grad.to(torch.bfloat16))
        x64, A64, B64 = _leaves64(x, A, B)
        ref = reference_delta(x64, list(A64), list(B64), case["scaling"].double(), ends, rows)
        ref.backward(grad.to(torch.bfloat16).double())
        pairs = ((delta, ref), (x.grad, x64.grad), (A.grad, A64.grad), (B.grad, B64.grad))
        errors[backend] = [(got.double() - want).abs().max().item() for got, want in pairs]
    for ours, plain in zip(errors["torch"], errors["naive"], strict=True):
        assert ours <= 2 * plain + 1e-3


# -- ranks that differ --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_pad_factors_ranks_that_differ(backend):
    gen = torch.Generator().manual_seed(3)
    in_f, out_f, ranks, ends = 10, 6, [1, 4, 2], [3, 7, 12]
    As = [_rand(gen, r, in_f).requires_grad_() for r in ranks]
    Bs = [_rand(gen, out_f, r).requires_grad_() for r in ranks]
    x = _rand(gen, 12, in_f).requires_grad_()
    scaling = torch.tensor([1.0, 0.5, 2.0])
    lora_A, lora_B = pad_factors(As, Bs)
    assert lora_A.shape == (3, 4, in_f) and lora_B.shape == (3, out_f, 4)
    lora_A.retain_grad()
    lora_B.retain_grad()
    delta = grouped_lora_delta(x, lora_A, lora_B, scaling, torch.tensor(ends), backend=backend)
    grad = torch.randn(delta.shape, generator=gen)
    delta.backward(grad)

    x64 = x.detach().double().requires_grad_()
    As64, Bs64 = _leaves64(*As), _leaves64(*Bs)
    ref = reference_delta(x64, As64, Bs64, scaling.double(), ends, None)
    ref.backward(grad.double())
    torch.testing.assert_close(delta.double(), ref, rtol=1e-5, atol=1e-5)
    for got, want in zip([*As, *Bs], [*As64, *Bs64], strict=True):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-5)
    for k, r in enumerate(ranks):  # the padding gets no gradient
        assert not lora_A.grad[k, r:].any() and not lora_B.grad[k, :, r:].any()


def test_pad_factors_refuses_mismatches():
    a, b = torch.zeros(2, 5), torch.zeros(3, 2)
    with pytest.raises(ValueError, match="As and Bs"):
        pad_factors([a], [])
    with pytest.raises(ValueError, match=r"Bs\[1\]"):
        pad_factors([a, a], [b, torch.zeros(4, 2)])
    with pytest.raises(TypeError, match=r"As\[1\]"):
        pad_factors([a, a.double()], [b, b])


# -- group_rows and mixed_lora_linear -----------------------------------------------------------


def test_group_rows():
    idx = torch.tensor([2, -1, 0, 2, 1, -1, 0, 2])
    rows, offsets = group_rows(idx, 4)
    assert rows.tolist() == [2, 6, 4, 0, 3, 7]  # stable within a group; -1 left out
    assert offsets.tolist() == [2, 3, 6, 6] and rows.dtype == offsets.dtype == torch.int64
    rows, offsets = group_rows(torch.full((3,), -1), 2)
    assert rows.tolist() == [] and offsets.tolist() == [0, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_left_out_get_zero_delta_and_dx(backend):
    case = make_case(8, 9, 7, 3, [0, 0, 0], None)
    rows, offsets = group_rows(torch.tensor([1, -1, 0, 2, -1, 1, 0, -1]), 3)
    case["rows"], case["offsets"] = rows, offsets
    check_against_reference(case, backend)
    assert not case["x"].grad[[1, 4, 7]].any() and case["x"].grad[[0, 2, 3]].abs().sum() > 0


def reference_mixed(x, weight, bias, As, Bs, scaling, idx):
    flat = x.reshape(-1, x.shape[-1])
    y = flat @ weight.T + (0 if bias is None else bias)
    lora = [
        scaling[i] * (Bs[i] @ (As[i] @ row)) if i >= 0 else torch.zeros_like(y[0])
        for row, i in zip(flat, idx.tolist(), strict=True)
    ]
    return (y + torch.stack(lora)).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_lora_linear_3d(backend, has_bias):
    gen = torch.Generator().manual_seed(4)
    in_f, out_f, k, r = 13, 9, 3, 2
    x = _rand(gen, 2, 5, in_f).requires_grad_()
    weight = _rand(gen, out_f, in_f)
    bias = _rand(gen, out_f).requires_grad_() if has_bias else None
    A = _rand(gen, k, r, in_f).requires_grad_()
    B = _rand(gen, k, out_f, r).requires_grad_()
    scaling = torch.tensor([0.5, 1.0, 2.0])
    idx = torch.tensor([2, -1, 0, 0, 1, 2, -1, 1, 1, 0])
    y = mixed_lora_linear(x, weight, bias, A, B, scaling, idx, backend=backend)
    assert y.shape == (2, 5, out_f)
    grad = torch.randn(y.shape, generator=gen)
    y.backward(grad)
    leaves = _leaves64(x, A, B) + ([] if bias is None else _leaves64(bias))
    x64, A64, B64 = leaves[:3]
    bias64 = leaves[3] if has_bias else None
    ref = reference_mixed(x64, weight.double(), bias64, list(A64), list(B64), scaling, idx)
    ref.backward(grad.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    tensors = [x, A, B] + ([bias] if has_bias else [])
    for got, want in zip(tensors, leaves, strict=True):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_on_one_adapter_equals_lora_linear(backend):
    gen = torch.Generator().manual_seed(5)
    x = _rand(gen, 3, 4, 12)
    weight, bias = _rand(gen, 10, 12), _rand(gen, 10)
    A, B = _rand(gen, 3, 4, 12), _rand(gen, 3, 10, 4)
    scaling = torch.tensor([0.25, 1.5, 3.0])
    y = mixed_lora_linear(x, weight, bias, A, B, scaling, torch.full((12,), 1), backend=backend)
    want = lora_linear(x, weight, bias, A[1], B[1], 1.5, backend=backend)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_mixed_under_autocast_casts_the_base_operands():
    """As lora_linear: x, W, b in the autocast dtype, the factors keep theirs (float32)."""
    gen = torch.Generator().manual_seed(7)
    x, weight, bias = _rand(gen, 2, 3, 16), _rand(gen, 12, 16), _rand(gen, 12)
    A, B = _rand(gen, 2, 4, 16), _rand(gen, 2, 12, 4)
    scaling, idx = torch.tensor([1.0, 0.5]), torch.tensor([0, 1, -1, 1, 0, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mixed_lora_linear(x, weight, bias, A, B, scaling, idx, backend="torch")
    bf16 = [t.to(torch.bfloat16) for t in (x, weight, bias)]
    want = mixed_lora_linear(*bf16, A, B, scaling, idx, backend="torch")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, want, rtol=0, atol=0)


# -- validation ---------------------------------------------------------------------------------


def _valid():
    case = make_case(6, 5, 4, 2, [2, 5], [0, 1, 2, 3, 4, 5])
    return {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


BAD = {
    "x 3-D": ({"x": torch.zeros(2, 3, 5)}, ValueError, "x must be 2-D"),
    "x int": ({"x": torch.zeros(6, 5, dtype=torch.int64)}, TypeError, "x must be a floating"),
    "lora_A 2-D": ({"lora_A": torch.zeros(2, 5)}, ValueError, "lora_A must be 3-D"),
    "lora_A in": ({"lora_A": torch.zeros(2, 2, 4)}, ValueError, "lora_A must be"),
    "lora_A r=0": (
        {"lora_A": torch.zeros(2, 0, 5), "lora_B": torch.zeros(2, 4, 0)},
        ValueError,
        "rank r",
    ),
    "lora_A narrower": (
        {
            "lora_A": torch.zeros(2, 2, 5, dtype=torch.bfloat16),
            "lora_B": torch.zeros(2, 4, 2, dtype=torch.bfloat16),
        },
        TypeError,
        "lora_A has dtype",
    ),
    "lora_B dtype": ({"lora_B": torch.zeros(2, 4, 2, dtype=torch.float64)}, TypeError, "lora_B"),
    "lora_B shape": ({"lora_B": torch.zeros(3, 4, 2)}, ValueError, "lora_B must be"),
    "scaling shape": ({"scaling": torch.ones(3)}, ValueError, "scaling must be"),
    "scaling int": ({"scaling": torch.ones(2, dtype=torch.int64)}, TypeError, "scaling"),
    "scaling grad": ({"scaling": torch.ones(2, requires_grad=True)}, ValueError, "scaling"),
    "scaling nan": ({"scaling": torch.tensor([1.0, float("nan")])}, ValueError, "scaling"),
    "offsets float": ({"offsets": torch.tensor([2.0, 5.0])}, TypeError, "offsets"),
    "offsets shape": ({"offsets": torch.tensor([2, 5, 6])}, ValueError, "offsets"),
    "offsets decrease": ({"offsets": torch.tensor([4, 2])}, ValueError, "offsets"),
    "offsets negative": ({"offsets": torch.tensor([-1, 2])}, ValueError, "offsets"),
    "offsets past M": ({"offsets": torch.tensor([2, 7])}, ValueError, "offsets"),
    "offsets list": ({"offsets": [2, 5]}, TypeError, "offsets"),
    "rows int32": ({"rows": torch.arange(6, dtype=torch.int32)}, TypeError, "rows"),
    "rows 2-D": ({"rows": torch.zeros(2, 3, dtype=torch.int64)}, ValueError, "rows"),
    "rows range": ({"rows": torch.tensor([0, 1, 2, 3, 4, 6])}, ValueError, "rows"),
    "rows negative": ({"rows": torch.tensor([0, 1, -2, 3, 4, 5])}, ValueError, "rows"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_validation_names_the_argument(name):
    change, error, match = BAD[name]
    with pytest.raises(error, match=match):
        grouped_lora_delta(**{**_valid(), **change}, backend="torch")


def test_validation_before_any_backend_choice():
    with pytest.raises(ValueError, match="unknown backend"):
        grouped_lora_delta(**_valid(), backend="cuda")


def test_mixed_validation():
    x, weight, A, B = (
        torch.zeros(2, 3, 5),
        torch.zeros(4, 5),
        torch.zeros(2, 2, 5),
        torch.zeros(2, 4, 2),
    )
    s, idx = torch.ones(2), torch.zeros(6, dtype=torch.int64)
    with pytest.raises(ValueError, match="adapter_index must be"):
        mixed_lora_linear(x, weight, None, A, B, s, idx[:5])
    with pytest.raises(ValueError, match="adapter_index values"):
        mixed_lora_linear(x, weight, None, A, B, s, torch.full((6,), 2))
    with pytest.raises(ValueError, match="scaling must be finite"):
        mixed_lora_linear(x, weight, None, A, B, torch.tensor([1.0, float("inf")]), idx)
    with pytest.raises(TypeError, match="adapter_index must be an integer"):
        mixed_lora_linear(x, weight, None, A, B, s, idx.float())
    with pytest.raises(ValueError, match="weight must be"):
        mixed_lora_linear(x, torch.zeros(3, 5), None, A, B, s, idx)
    with pytest.raises(ValueError, match="bias must be"):
        mixed_lora_linear(x, weight, torch.zeros(3), A, B, s, idx)
    with pytest.raises(ValueError, match="weight requires grad"):
        mixed_lora_linear(x, weight.requires_grad_(), None, A, B, s, idx)
    with pytest.raises(ValueError, match="group_index values"):
        group_rows(torch.tensor([0, -2]), 2)


# -- torch.compile ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backend", ["torch", pytest.param("triton", marks=[NEEDS_TRITON, pytest.mark.slow])]
)
def test_fullgraph_compile_matches_eager(backend):
    """MoE-style grouped delta then a mixed-adapter layer, compiled whole: forward + backward."""
    gen = torch.Generator().manual_seed(6)
    in_f, hidden, k, r = 12, 10, 3, 2
    weight = _rand(gen, hidden, in_f)
    bias = _rand(gen, hidden).requires_grad_()
    A1, B1 = _rand(gen, k, r, in_f).requires_grad_(), _rand(gen, k, in_f, r).requires_grad_()
    A2, B2 = _rand(gen, k, r, in_f).requires_grad_(), _rand(gen, k, hidden, r).requires_grad_()
    scaling = torch.tensor([0.5, 1.0, 2.0])
    rows = torch.tensor([3, 0, 5, 1, 3, 2, 4, 0])
    offsets = torch.tensor([3, 3, 7], dtype=torch.int32)
    idx = torch.tensor([1, -1, 0, 2, 2, 1])

    def model(x):
        h = x.index_add(0, rows, grouped_lora_delta(x, A1, B1, scaling, offsets, rows,
                                                    backend=backend))  # fmt: skip
        return mixed_lora_linear(torch.tanh(h), weight, bias, A2, B2, scaling, idx,
                                 backend=backend)  # fmt: skip

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = _rand(gen, 6, in_f).requires_grad_()
    params = [x, bias, A1, B1, A2, B2]
    results = []
    for run in (model, compiled):
        y = run(x)
        y.square().sum().backward()
        results.append([y.detach(), *[p.grad.clone() for p in params]])
        for p in params:
            p.grad = None
    for eager, comp in zip(*results, strict=True):
        torch.testing.assert_close(comp, eager)


SEED = 9


# -- CUDA: the Triton kernels against the torch backend (run by benchmarks/gpu_check.sh) ---------


def _rel_err(got, want):
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


@pytest.mark.cuda
@pytest.mark.parametrize(
    "dtype, factor_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
     (torch.bfloat16, torch.float32)],
    ids=["fp32", "bf16", "bf16-fp32-factors"],
)  # fmt: skip
@pytest.mark.parametrize("routing", ["moe_top2", "mixed"])
def test_cuda_triton_matches_torch_backend(dtype, factor_dtype, routing):
    """Realistic sizes, not multiples of the tiles: triton's error against float64 at most ~2x
    the torch backend's (same dtypes), forward and the three gradients; empty groups included."""
    gen = torch.Generator().manual_seed(8)
    n, in_f, out_f, k, r = 1500, 1000, 760, 12, 16
    if routing == "moe_top2":  # each token to two experts, sorted by expert; expert 3 unused
        experts = torch.randint(0, k, (n, 2), generator=gen)
        experts[experts == 3] = 4
        rows, offsets = group_rows(experts.flatten(), k)
        rows = rows // 2  # pair p -> token p // 2
    else:  # a mixed batch, some rows without an adapter
        rows, offsets = group_rows(torch.randint(-1, k, (n,), generator=gen), k)
    base = {
        "x": _rand(gen, n, in_f),
        "lora_A": _rand(gen, k, r, in_f, scale=in_f**-0.5),
        "lora_B": _rand(gen, k, out_f, r, scale=0.5),
    }
    grad = torch.randn(rows.shape[0], out_f, generator=gen)
    scaling = torch.linspace(0.5, 2.0, k, device="cuda")
    results = {}
    for name, backend, x_dtype, f_dtype in (
        ("ref", "torch", torch.float64, torch.float64),
        ("torch", "torch", dtype, factor_dtype),
        ("triton", "triton", dtype, factor_dtype),
    ):
        x = base["x"].to("cuda", x_dtype, copy=True).requires_grad_()
        A = base["lora_A"].to("cuda", f_dtype, copy=True).requires_grad_()
        B = base["lora_B"].to("cuda", f_dtype, copy=True).requires_grad_()
        delta = grouped_lora_delta(x, A, B, scaling.to(f_dtype), offsets.cuda(), rows.cuda(),
                                   backend=backend)  # fmt: skip
        delta.backward(grad.to("cuda", x_dtype))
        results[name] = [delta.detach(), x.grad, A.grad, B.grad]
    for label, want, torch_out, triton_out in zip(
        ("delta", "dx", "dA", "dB"),
        results["ref"],
        results["torch"],
        results["triton"],
        strict=True,
    ):
        assert triton_out.dtype == torch_out.dtype, label
        bound = 1e-5 if dtype == torch.float32 else 2 * _rel_err(torch_out, want) + 2e-3
        assert _rel_err(triton_out, want) <= bound, label


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_mixed_lora_linear_matches_torch_backend(dtype):
    """The fused layer (the expand adds into the base output) against the torch backend's,
    forward and every gradient; both against float64."""
    gen = torch.Generator().manual_seed(SEED)
    tensors = {
        "x": _rand(gen, 4, 300, 520),
        "weight": _rand(gen, 390, 520, scale=520**-0.5),
        "bias": _rand(gen, 390),
        "lora_A": _rand(gen, 5, 8, 520, scale=520**-0.5),
        "lora_B": _rand(gen, 5, 390, 8),
    }
    scaling = (torch.rand(5, generator=gen) + 0.5).cuda()
    idx = torch.randint(-1, 5, (1200,), generator=gen).cuda()
    grad = torch.randn(4, 300, 390, generator=gen)
    results = {}
    for name, backend, run_dtype in (
        ("ref", "torch", torch.float64),
        ("torch", "torch", dtype),
        ("triton", "triton", dtype),
    ):
        leaf = {k: v.to("cuda", run_dtype, copy=True) for k, v in tensors.items()}
        for k in ("x", "bias", "lora_A", "lora_B"):
            leaf[k].requires_grad_()
        y = mixed_lora_linear(**leaf, scaling=scaling.to(run_dtype), adapter_index=idx,
                              backend=backend)  # fmt: skip
        y.backward(grad.to("cuda", run_dtype))
        results[name] = [y.detach()] + [leaf[k].grad for k in ("x", "bias", "lora_A", "lora_B")]
    for label, want, torch_out, triton_out in zip(
        ("y", "dx", "dbias", "dA", "dB"), *results.values(), strict=True
    ):
        bound = 1e-5 if dtype == torch.float32 else 2 * _rel_err(torch_out, want) + 2e-3
        assert _rel_err(triton_out, want) <= bound, label
