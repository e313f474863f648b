"""Memory contract: what the ops save for backward and which temporaries they create.

Saved tensors are counted as distinct storages through ``saved_tensors_hooks`` (parameters
excluded). Temporaries are seen through a dispatch mode that records every op's output.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from peft_kernels import dora_weight_norm, weight_row_sq_norm
from tests.helpers.peft_layers import peft_linear
from tests.helpers.reference import NEEDS_TRITON, call, make_inputs

M, IN, OUT, R = 33, 24, 20, 3  # distinct sizes, so shapes tell tensors apart
BACKENDS = ["torch", pytest.param("triton", marks=NEEDS_TRITON)]


def saved_storages(fn, parameters):
    """{storage pointer: (shape, dtype, bytes)} of the non-parameter tensors ``fn`` saves."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in parameters}
    saved = {}

    def pack(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in param_ptrs:
            saved[ptr] = (tuple(tensor.shape), tensor.dtype, tensor.untyped_storage().nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def parameters_of(inputs):
    return [v for k, v in inputs.items() if k != "x" and torch.is_tensor(v)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_saved_for_backward(backend, method, p):
    inputs = make_inputs(method, M, IN, OUT, R)
    outputs = []
    saved = saved_storages(
        lambda: outputs.append(call(method, inputs, backend, p)), parameters_of(inputs)
    )
    shapes = sorted((shape, str(dtype)) for shape, dtype, _ in saved.values())
    expected = [((M, IN), torch.float32), ((M, R), torch.float32)]  # x and u
    if p and backend == "torch":
        expected.append(((M, IN), torch.bool))  # the keep mask, 1 byte per element
    if p and backend == "triton":
        expected.append(((1,), torch.int64))  # the Philox seed
    if method == "dora":
        # the norm, and for grad_m the output y itself (torch, no dropout) or base (M, out)
        expected += [((M, OUT), torch.float32), ((OUT,), torch.float32)]
    assert shapes == sorted((shape, str(dtype)) for shape, dtype in expected)
    assert inputs["x"].untyped_storage().data_ptr() in saved  # x itself, not a copy
    y_saved = outputs[0].untyped_storage().data_ptr() in saved
    assert y_saved == (method == "dora" and backend == "torch" and not p)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_dora_output_saved_by_its_consumer_costs_nothing_more(p):
    """DoRA without dropout keeps y, which a consumer such as SiLU saves anyway: beyond LoRA's
    x and u, only the norm (out,) is new. With dropout, base (M, out) is kept as well."""
    saved_by = {}
    for method in ("lora", "dora"):
        inputs = make_inputs(method, M, IN, OUT, R)

        def layer_then_silu(method=method, inputs=inputs):
            return torch.nn.functional.silu(call(method, inputs, "torch", p))

        saved = saved_storages(layer_then_silu, parameters_of(inputs))
        saved_by[method] = sum(nbytes for _, _, nbytes in saved.values())
    extra = saved_by["dora"] - saved_by["lora"]
    assert extra == OUT * 4 + (M * OUT * 4 if p else 0)


def test_dora_saves_at_most_055_of_peft_beyond_x():
    pytest.importorskip("peft")
    inputs = make_inputs("dora", 64, 48, 56, 4)
    model, _ = peft_linear(inputs, use_dora=True, rank=4, lora_alpha=8)
    x = inputs["x"]
    x_ptr = x.untyped_storage().data_ptr()
    ours = saved_storages(lambda: call("dora", inputs, "torch"), parameters_of(inputs))
    theirs = saved_storages(lambda: model(x), list(model.parameters()))
    ours_beyond_x = sum(b for ptr, (_, _, b) in ours.items() if ptr != x_ptr)
    theirs_beyond_x = sum(b for ptr, (_, _, b) in theirs.items() if ptr != x_ptr)
    assert ours_beyond_x <= 0.55 * theirs_beyond_x


class RecordNewTensors(TorchDispatchMode):
    """Records the shape of every op output that is a new storage (views excluded)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if torch.is_tensor(a)]
        input_ptrs = {a.untyped_storage().data_ptr() for a in inputs}
        for t in torch.utils._pytree.tree_leaves(out):
            if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in input_ptrs:
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_torch_backend_temporaries(method, p):
    """No out×in tensor anywhere; at most the allowed M×out tensors in forward and backward."""
    inputs = make_inputs(method, M, IN, OUT, R)
    recorder = RecordNewTensors()
    with recorder:
        y = call(method, inputs, "torch", p)
        y.backward(torch.ones_like(y))
    assert (OUT, IN) not in recorder.shapes and (IN, OUT) not in recorder.shapes
    m_by_out = recorder.shapes.count((M, OUT))
    # y and ones_like(y); DoRA: the one backward buffer (g ⊙ y, then G); with dropout also base.
    allowed = 2 + (1 if method == "dora" else 0) + (1 if method == "dora" and p else 0)
    assert m_by_out <= allowed


def test_weight_norm_never_builds_the_out_by_in_matrix():
    inputs = make_inputs("dora", M, IN, OUT, R)
    w, a, b = inputs["weight"], inputs["lora_A"], inputs["lora_B"]
    cached = weight_row_sq_norm(w)
    recorder = RecordNewTensors()
    with recorder:
        dora_weight_norm(w, a, b, 0.7, cached)
    assert (OUT, IN) not in recorder.shapes and recorder.shapes  # it did run ops
