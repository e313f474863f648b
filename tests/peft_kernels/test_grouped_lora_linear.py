"""``grouped_lora_linear`` over a ``RowGroups`` against the float64 per-row reference of
``test_grouped_lora`` (forward, the gradients of x, bias, A and B), ``mixed_lora_linear`` on the
same ids, ``gradcheck``, ``torch.compile`` and ``RowGroups``' checks."""

from __future__ import annotations

import pytest
import torch

from peft_kernels import RowGroups, group_rows, grouped_lora_linear, mixed_lora_linear
from tests.helpers.reference import NEEDS_TRITON
from tests.peft_kernels.test_grouped_lora import BACKENDS, _leaves64, _rand, reference_mixed

# per-row adapter ids over N = 12 rows, K = 3 adapters: which path each one takes in the torch
# backend is in its name (rows in order and groups of one size: the expand accumulates into y)
LAYOUTS = {
    "in_order_uniform": [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2],
    "in_order_uniform_base_tail": [0, 0, 0, 1, 1, 1, 2, 2, 2, -1, -1, -1],
    "in_order_uneven": [0, 1, 1, 1, 1, 1, 2, 2, 2, 2, -1, -1],
    "one_adapter_of_three": [1] * 12,
    "round_robin": [0, 1, 2] * 4,
    "unsorted_with_base": [2, -1, 0, 0, 1, 2, -1, 1, 1, 0, 2, 0],
}


def _case(seed, in_f=13, out_f=9, k=3, r=2, has_bias=True, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return {
        "x": _rand(gen, 2, 6, in_f, dtype=dtype).requires_grad_(),
        "weight": _rand(gen, out_f, in_f, dtype=dtype),
        "bias": _rand(gen, out_f, dtype=dtype).requires_grad_() if has_bias else None,
        "lora_A": _rand(gen, k, r, in_f, scale=in_f**-0.5).requires_grad_(),
        "lora_B": _rand(gen, k, out_f, r, scale=0.5).requires_grad_(),
        "scaling": torch.linspace(0.5, 2.0, k),
    }


_NAMES = ("x", "bias", "lora_A", "lora_B")


def _grads(case):
    return [None if case[n] is None else case[n].grad for n in _NAMES]


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_and_mixed_lora_linear(backend, layout, has_bias, rank):
    idx = torch.tensor(LAYOUTS[layout])
    groups = RowGroups.from_index(idx, 3)
    assert (groups.rows is None) == layout.startswith(("in_order", "one_adapter"))
    case = _case(3, r=rank, has_bias=has_bias)
    y = grouped_lora_linear(**case, groups=groups, backend=backend)
    assert y.shape == (2, 6, 9) and y.dtype == torch.float32
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    y.backward(grad)
    got = [y, *_grads(case)]

    names = ["x", "bias", "lora_A", "lora_B"] if has_bias else ["x", "lora_A", "lora_B"]
    leaves = dict(zip(names, _leaves64(*(case[n] for n in names)), strict=True))
    ref = reference_mixed(
        leaves["x"], case["weight"].double(), leaves.get("bias"), list(leaves["lora_A"]),
        list(leaves["lora_B"]), case["scaling"].double(), idx,
    )  # fmt: skip
    ref.backward(grad.double())
    want = [ref, *(None if n not in leaves else leaves[n].grad for n in _NAMES)]
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)

    for name in names:  # the same ids through mixed_lora_linear (which sorts them itself)
        case[name].grad = None
    y_mixed = mixed_lora_linear(**case, adapter_index=idx, backend=backend)
    y_mixed.backward(grad)
    torch.testing.assert_close(y_mixed, y, rtol=1e-6, atol=1e-6)
    for g, w in zip(_grads(case), got[1:], strict=True):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["in_order_uniform_base_tail", "unsorted_with_base"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_x_with_float32_factors(backend, layout):
    """The adapter math in float32, y in bfloat16: within bfloat16's rounding of the reference."""
    idx = torch.tensor(LAYOUTS[layout])
    case = _case(5, in_f=16, out_f=12, dtype=torch.bfloat16)
    y = grouped_lora_linear(**case, groups=RowGroups.from_index(idx, 3), backend=backend)
    assert y.dtype == torch.bfloat16
    ref = reference_mixed(
        case["x"].double(), case["weight"].double(), case["bias"].double(),
        list(case["lora_A"].double()), list(case["lora_B"].double()), case["scaling"].double(),
        idx,
    )  # fmt: skip
    # two bf16 roundings (the base product, then y + δ): within ~1.3 bf16 eps of |y|max
    torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


@pytest.mark.parametrize("layout", ["in_order_uniform_base_tail", "unsorted_with_base"])
def test_gradcheck_float64(layout):
    idx = torch.tensor(LAYOUTS[layout])
    groups = RowGroups.from_index(idx, 3)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(12, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    bias = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    A = torch.randn(3, 2, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    B = torch.randn(3, 4, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    scaling = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)

    def op(x, bias, A, B):
        return grouped_lora_linear(x, weight, bias, A, B, scaling, groups, backend="torch")

    assert torch.autograd.gradcheck(op, (x, bias, A, B))


def test_from_index_agrees_with_group_rows():
    idx = torch.tensor([2, -1, 0, 2, 1, -1, 0, 2])
    groups = RowGroups.from_index(idx, 4)
    rows, offsets = group_rows(idx, 4)
    assert groups.rows[: len(rows)].tolist() == rows.tolist()
    assert sorted(groups.rows.tolist()) == list(range(8))  # a permutation: -1 rows last
    assert groups.offsets.tolist() == offsets.tolist() and groups.n_rows == 8
    assert RowGroups.from_index(torch.tensor([0, 0, 1, -1]), 2).rows is None


def test_row_groups_of_inference_tensors():
    """Made under torch.inference_mode (no version counters): usable there and after."""
    case = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in _case(8).items()}
    idx = torch.tensor(LAYOUTS["unsorted_with_base"])
    want = grouped_lora_linear(**case, groups=RowGroups.from_index(idx, 3), backend="torch")
    with torch.inference_mode():
        groups = RowGroups.from_index(idx, 3)
        got = grouped_lora_linear(**case, groups=groups, backend="torch")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(grouped_lora_linear(**case, groups=groups), want, rtol=0, atol=0)


def _valid():
    x, weight = torch.zeros(2, 3, 5), torch.zeros(4, 5)
    A, B, s = torch.zeros(2, 2, 5), torch.zeros(2, 4, 2), torch.ones(2)
    return x, weight, A, B, s


def test_row_groups_checks_its_values_when_made():
    with pytest.raises(ValueError, match="offsets must be the non-decreasing"):
        RowGroups(torch.tensor([4, 2]), None, 6)
    with pytest.raises(ValueError, match="offsets must be the non-decreasing"):
        RowGroups(torch.tensor([2, 7]), None, 6)
    with pytest.raises(ValueError, match="offsets must be the non-decreasing"):
        RowGroups(torch.tensor([-1, 2]), None, 6)
    with pytest.raises(ValueError, match="rows must be a permutation"):
        RowGroups(torch.tensor([2, 6]), torch.tensor([0, 1, 1, 3, 4, 5]), 6)
    with pytest.raises(ValueError, match="rows must be a permutation"):
        RowGroups(torch.tensor([2, 6]), torch.tensor([0, 1, 2, 3, 4, 6]), 6)
    with pytest.raises(TypeError, match="rows must be int64"):
        RowGroups(torch.tensor([2, 5]), torch.arange(5), 6)
    with pytest.raises(TypeError, match="offsets must be 1-D int64"):
        RowGroups(torch.tensor([2, 6], dtype=torch.int32), None, 6)
    with pytest.raises(TypeError, match="offsets must be a torch"):
        RowGroups([2, 6], None, 6)
    with pytest.raises(ValueError, match="n_rows must be"):
        RowGroups(torch.tensor([2, 6]), None, -1)
    with pytest.raises(ValueError, match="group_index values"):
        RowGroups.from_index(torch.tensor([0, 2]), 2)


def test_grouped_lora_linear_refuses_groups_that_do_not_fit():
    x, weight, A, B, s = _valid()
    groups = RowGroups(torch.tensor([3, 6]), None, 6)
    with pytest.raises(TypeError, match="groups must be a RowGroups"):
        grouped_lora_linear(x, weight, None, A, B, s, (torch.tensor([3, 6]), None))
    with pytest.raises(ValueError, match="groups must group x's N = 4 rows"):
        grouped_lora_linear(x[:, :2], weight, None, A, B, s, groups)
    with pytest.raises(ValueError, match="into K = 3 groups"):
        grouped_lora_linear(x, weight, None, A.repeat(2, 1, 1)[:3], B.repeat(2, 1, 1)[:3],
                            torch.ones(3), groups)  # fmt: skip
    with pytest.raises(ValueError, match="scaling must be finite"):
        grouped_lora_linear(x, weight, None, A, B, torch.tensor([1.0, float("nan")]), groups)
    with pytest.raises(ValueError, match="weight must be"):
        grouped_lora_linear(x, torch.zeros(3, 5), None, A, B, s, groups)
    groups.offsets[0] = 1  # changed after its values were checked
    with pytest.raises(ValueError, match="changed in place"):
        grouped_lora_linear(x, weight, None, A, B, s, groups)


@pytest.mark.parametrize(
    "backend", ["torch", pytest.param("triton", marks=[NEEDS_TRITON, pytest.mark.slow])]
)
def test_fullgraph_compile_matches_eager(backend):
    gen = torch.Generator().manual_seed(6)
    weight, bias = _rand(gen, 10, 12), _rand(gen, 10).requires_grad_()
    A, B = _rand(gen, 3, 2, 12).requires_grad_(), _rand(gen, 3, 10, 2).requires_grad_()
    scaling = torch.tensor([0.5, 1.0, 2.0])
    uniform = RowGroups.from_index(torch.tensor([0, 0, 1, 1, 2, 2]), 3)
    unsorted = RowGroups.from_index(torch.tensor([1, -1, 0, 2, 2, 1]), 3)

    def model(x):
        h = grouped_lora_linear(x, weight, bias, A, B, scaling, uniform, backend=backend)
        h = torch.tanh(h) @ weight
        return grouped_lora_linear(h, weight, None, A, B, scaling, unsorted, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = _rand(gen, 6, 12).requires_grad_()
    params = [x, bias, A, B]
    results = []
    for run in (model, compiled):
        y = run(x)
        y.square().sum().backward()
        results.append([y.detach(), *[p.grad.clone() for p in params]])
        for p in params:
            p.grad = None
    for eager, comp in zip(*results, strict=True):
        torch.testing.assert_close(comp, eager)


def test_under_autocast_casts_the_base_operands():
    """As mixed_lora_linear: x, W, b in the autocast dtype, the factors keep theirs."""
    case = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in _case(9).items()}
    groups = RowGroups.from_index(torch.tensor(LAYOUTS["in_order_uniform"]), 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_lora_linear(**case, groups=groups, backend="torch")
    bf16 = {k: case[k].to(torch.bfloat16) for k in ("x", "weight", "bias")}
    want = grouped_lora_linear(**{**case, **bf16}, groups=groups, backend="torch")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, want, rtol=0, atol=0)
