"""The Triton launchers of ``peft_kernels.triton_linear`` against float64 references.

Without a GPU, ``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before triton is imported and
the kernels run on CPU tensors through the interpreter (slow: the shapes here are small and
deliberately not multiples of any block size).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from peft_kernels import triton_common
from peft_kernels import triton_linear as tlin
from peft_kernels.contract import Saved

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_RTOL = 1e-4  # max-abs error relative to the reference's max-abs


def _make_inputs(
    M: int,
    d_in: int,
    d_out: int,
    r: int,
    dtype=torch.float32,
    device=DEVICE,
    seed: int = 0,
    transposed_weight: bool = False,
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device, dtype)

    weight = rand(d_out, d_in, scale=d_in**-0.5)
    if transposed_weight:  # W with column-major strides
        weight = weight.t().contiguous().t()
    return {
        "x": rand(M, d_in),
        "weight": weight,
        "bias": rand(d_out),
        "lora_A": rand(r, d_in, scale=d_in**-0.5),
        "lora_B": rand(d_out, r, scale=r**-0.5),
        "magnitude": rand(d_out).abs() + 0.5,
        "weight_norm": rand(d_out).abs() + 0.5,
    }


def _reference(inp, scaling, p, keep, grad_y, dora, has_bias, dtype=torch.float64):
    """y, u, base and every gradient by autograd, in ``dtype`` (float64: the reference).

    The weight norm is a constant (no gradient), as in the kernels.
    """
    names = (
        ["x", "lora_A", "lora_B"] + (["magnitude"] if dora else []) + (["bias"] if has_bias else [])
    )
    t = {k: v.detach().to(dtype) for k, v in inp.items()}
    for name in names:
        t[name].requires_grad_(True)
    x, W, A, B = t["x"], t["weight"], t["lora_A"], t["lora_B"]
    bias = t["bias"] if has_bias else torch.zeros((), dtype=dtype, device=x.device)
    x_drop = x * keep.to(dtype) / (1.0 - p) if keep is not None else x
    u = x_drop @ A.t()
    if dora:
        c = t["magnitude"] / t["weight_norm"]
        base = x_drop @ W.t() + scaling * (u @ B.t())
        y = (x - x_drop) @ W.t() + c * base + bias
    else:
        base = None
        y = x @ W.t() + bias + scaling * (u @ B.t())
    grads = torch.autograd.grad(y, [t[n] for n in names], grad_y.to(dtype))
    return y.detach(), u.detach(), base, dict(zip(names, grads, strict=True))


def _forward(inp, scaling, p, seed, dora, has_bias):
    """``tlin.forward`` on ``inp`` (DoRA iff ``dora``)."""
    return tlin.forward(
        inp["x"],
        inp["weight"],
        inp["bias"] if has_bias else None,
        inp["lora_A"],
        inp["lora_B"],
        inp["magnitude"] if dora else None,
        inp["weight_norm"] if dora else None,
        scaling=scaling,
        dropout_p=p,
        seed=seed,
    )


def _backward(inp, out, grad_y, scaling, p, dora, has_bias, needs_grad_x=True):
    """``tlin.backward`` with what ``out`` (a ``Forward``) asked to keep."""
    saved = Saved(
        inp["x"],
        inp["weight"],
        inp["bias"] if has_bias else None,
        inp["lora_A"],
        inp["lora_B"],
        inp["magnitude"] if dora else None,
        inp["weight_norm"] if dora else None,
        out.u,
        out.dropout_state if p > 0 else None,
        (out.base if out.base.numel() else out.y) if dora else None,
    )
    return tlin.backward(
        grad_y,
        saved,
        scaling=scaling,
        dropout_p=p,
        needs_grad_x=needs_grad_x,
        needs_grad_bias=has_bias,
    )


def _run(inp, scaling, p, seed, grad_y, dora, has_bias, needs_grad_x=True):
    """Triton forward + backward; returns (y, u, base, {name: grad})."""
    out = _forward(inp, scaling, p, seed, dora, has_bias)
    grads = _backward(inp, out, grad_y, scaling, p, dora, has_bias, needs_grad_x)
    named = {
        "x": grads.x,
        "lora_A": grads.lora_A,
        "lora_B": grads.lora_B,
        "magnitude": grads.magnitude,
        "bias": grads.bias,
    }
    base = out.base if dora else None
    return out.y, out.u, base, {k: v for k, v in named.items() if v is not None}


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    scale = expected.abs().max().clamp_min(1e-30)
    return ((actual.double() - expected).abs().max() / scale).item()


def _seed(p: float, value: int = 1234):
    return torch.tensor([value], dtype=torch.int64, device=DEVICE) if p > 0 else None


def _check(inp, scaling, p, dora, has_bias, rtol=FP32_RTOL, needs_grad_x=True):
    M, d_out = inp["x"].shape[0], inp["weight"].shape[0]
    seed = _seed(p)
    keep = tlin.dropout_keep_mask(seed, M, inp["x"].shape[1], p) if p > 0 else None
    grad_y = torch.randn(M, d_out, generator=torch.Generator().manual_seed(7)).to(inp["x"])
    y, u, base, grads = _run(inp, scaling, p, seed, grad_y, dora, has_bias, needs_grad_x)
    ref_y, ref_u, ref_base, ref_grads = _reference(inp, scaling, p, keep, grad_y, dora, has_bias)
    if not needs_grad_x:
        del ref_grads["x"]

    assert y.dtype == u.dtype == inp["x"].dtype
    assert _rel_err(y, ref_y) < rtol, "y"
    assert _rel_err(u, ref_u) < rtol, "u"
    if dora:
        assert base.shape == y.shape and _rel_err(base, ref_base) < rtol, "base"
    assert set(grads) == set(ref_grads)
    for name, ref in ref_grads.items():
        assert grads[name].shape == inp[name].shape, name
        assert grads[name].dtype == inp[name].dtype, name
        assert _rel_err(grads[name], ref) < rtol, f"grad of {name}"


# ---------------------------------------------------------------------------------------------
# Correctness (fp32) against float64 autograd
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("r", [1, 3, 8])
def test_matches_reference(r, has_bias, p, dora):
    inp = _make_inputs(37, 70, 45, r)
    _check(inp, 0.7, p, dora, has_bias)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("r", [1, 8])
def test_matches_reference_wide_out(r, p, dora):
    """in < out, and W stored column-major (the kernels read it through its strides)."""
    inp = _make_inputs(21, 38, 75, r, transposed_weight=True)
    assert not inp["weight"].is_contiguous()
    _check(inp, 2.0, p, dora, has_bias=True)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
def test_rank_spanning_several_tiles(monkeypatch, p, dora):
    """r = 20 with 16-wide rank tiles: the rank loops and the rank grid axis are exercised."""
    monkeypatch.setattr(triton_common, "MAX_BLOCK_R", 16)
    inp = _make_inputs(37, 70, 45, 20)
    _check(inp, 0.5, p, dora, has_bias=True)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_skips_grad_x_and_grad_bias(dora):
    inp = _make_inputs(37, 70, 45, 3)
    _check(inp, 0.7, 0.3, dora, has_bias=False, needs_grad_x=False)


def test_non_contiguous_grad_y():
    """grad_y of ``y.sum()`` is an expanded (stride 0) tensor: strides are honoured."""
    inp = _make_inputs(37, 70, 45, 3)
    out = _forward(inp, 0.7, 0.0, None, dora=True, has_bias=True)
    grad_y = torch.ones((), device=DEVICE).expand_as(out.y)  # stride 0 in both dims
    got = _backward(inp, out, grad_y, 0.7, 0.0, dora=True, has_bias=True)
    want = _backward(inp, out, grad_y.contiguous(), 0.7, 0.0, dora=True, has_bias=True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_dropout_is_a_function_of_the_seed(dora):
    inp = _make_inputs(37, 70, 45, 3)

    def forward(seed_value):
        out = _forward(inp, 0.7, 0.3, _seed(0.3, seed_value), dora, has_bias=True)
        return (out.y, out.u) + ((out.base,) if dora else ())

    first, again, other = forward(1), forward(1), forward(2)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(first, other, strict=True):
        assert not torch.equal(a, b)


def test_keep_mask_statistics_and_seeding():
    p = 0.3
    keep = tlin.dropout_keep_mask(_seed(p, 5), 300, 500, p)
    assert keep.dtype == torch.bool and keep.shape == (300, 500)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01  # 150k draws: std ≈ 0.0012
    # rows and columns are not correlated copies of each other
    assert not torch.equal(keep[0], keep[1]) and not torch.equal(keep[:, 0], keep[:, 1])
    assert torch.equal(keep, tlin.dropout_keep_mask(_seed(p, 5), 300, 500, p))
    assert not torch.equal(keep, tlin.dropout_keep_mask(_seed(p, 6), 300, 500, p))
    # a prefix of the rows is the same stream (counters are row * num_cols + col)
    assert torch.equal(keep[:17], tlin.dropout_keep_mask(_seed(p, 5), 17, 500, p))
    assert tlin.dropout_keep_mask(_seed(p, 5), 40, 50, 0.0).all()


def test_rejects_bad_dropout_arguments():
    inp = _make_inputs(5, 16, 16, 2)
    with pytest.raises(ValueError, match="dropout_p"):
        _forward(inp, 1.0, 1.0, _seed(1.0), dora=False, has_bias=False)
    with pytest.raises(ValueError, match="needs seed"):
        _forward(inp, 1.0, 0.1, None, dora=False, has_bias=False)


# ---------------------------------------------------------------------------------------------
# bf16 / fp16: as accurate as plain torch math in that dtype (small shapes here, realistic
# ones on a GPU)
# ---------------------------------------------------------------------------------------------


# The interpreter rounds fp32 -> bf16 toward zero (twice the worst-case error of the GPU's
# round-to-nearest-even), hence a looser factor there.
HALF_FACTOR = 4.0 if tlin.INTERPRET else 2.0


def _check_half(inp, scaling, p, dora):
    """Error vs the float64 reference at most ~2x that of the same math in plain torch, in x's
    16-bit dtype (bf16 or fp16)."""
    dtype = inp["x"].dtype
    M, d_in = inp["x"].shape
    seed = _seed(p)
    keep = tlin.dropout_keep_mask(seed, M, d_in, p) if p > 0 else None
    grad_y = torch.randn(M, inp["weight"].shape[0], generator=torch.Generator().manual_seed(7))
    grad_y = grad_y.to(inp["x"])
    y, u, base, grads = _run(inp, scaling, p, seed, grad_y, dora, has_bias=True)
    ref = _reference(inp, scaling, p, keep, grad_y, dora, True)
    low = _reference(inp, scaling, p, keep, grad_y, dora, True, dtype=dtype)
    pairs = [("y", y, ref[0], low[0]), ("u", u, ref[1], low[1])]
    if dora:
        pairs.append(("base", base, ref[2], low[2]))
    pairs += [(f"grad of {k}", grads[k], ref[3][k], low[3][k]) for k in ref[3]]
    for name, got, want, torch_half in pairs:
        assert got.dtype == dtype, name
        assert _rel_err(got, want) <= HALF_FACTOR * _rel_err(torch_half, want) + 1e-3, name


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_small(dtype, p, dora):
    _check_half(_make_inputs(37, 70, 45, 8, dtype=dtype), 2.0, p, dora)


@pytest.mark.cuda
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
def test_cuda_large(dtype, p, dora):
    """Realistic sizes on the GPU: fp32 close to float64, bf16 and fp16 as in ``_check_half``."""
    inp = _make_inputs(1000, 768, 768, 16, dtype=dtype, device="cuda")
    if dtype == torch.float32:
        _check(inp, 2.0, p, dora, has_bias=True)
    else:
        _check_half(inp, 2.0, p, dora)
