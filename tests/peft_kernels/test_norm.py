"""``dora_weight_norm`` (factored) against the float64 direct norm ‖W + s·B A‖_row."""

import pytest
import torch

from peft_kernels import dora_weight_norm, weight_row_sq_norm


def direct_norm64(w, a, b, s):
    return torch.linalg.vector_norm(w.double() + s * b.double() @ a.double(), dim=1)


@pytest.mark.parametrize("rank", [1, 4, 16])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_matches_direct_norm(rank, dtype, tol):
    gen = torch.Generator().manual_seed(rank)
    w = torch.randn(45, 70, generator=gen, dtype=dtype)
    a = torch.randn(rank, 70, generator=gen, dtype=dtype) * 0.1
    b = torch.randn(45, rank, generator=gen, dtype=dtype)
    got = dora_weight_norm(w, a, b, 1.5)
    assert got.dtype == dtype
    ref = direct_norm64(w, a, b, 1.5)
    assert ((got.double() - ref).abs() / ref).max() < tol


def test_low_precision_is_computed_in_float32():
    gen = torch.Generator().manual_seed(0)
    w, a, b = (torch.randn(*s, generator=gen) for s in [(30, 50), (4, 50), (30, 4)])
    got = dora_weight_norm(w.bfloat16(), a.bfloat16(), b.bfloat16(), 0.5)
    assert got.dtype == torch.float32
    ref = direct_norm64(w.bfloat16(), a.bfloat16(), b.bfloat16(), 0.5)
    assert ((got.double() - ref).abs() / ref).max() < 1e-2  # bf16 rounding of W Aᵀ only


def test_cached_square_norm_and_gradient_free():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(20, 30, generator=gen)
    a = torch.randn(3, 30, generator=gen, requires_grad=True)
    b = torch.randn(20, 3, generator=gen, requires_grad=True)
    got = dora_weight_norm(w, a, b, 2.0, weight_row_sq_norm(w))
    torch.testing.assert_close(got, dora_weight_norm(w, a, b, 2.0))
    assert not got.requires_grad  # a constant for backward (DoRA §4.3)


def test_clamped_at_zero_when_the_update_cancels_w():
    """W = −s·B A: the exact norm is 0; rounding must not make it NaN."""
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(2, 16, generator=gen)
    b = torch.randn(8, 2, generator=gen)
    w = -(b @ a)
    got = dora_weight_norm(w, a, b, 1.0)
    assert torch.isfinite(got).all() and got.abs().max() < 1e-2


def test_shape_errors():
    with pytest.raises(ValueError, match="shapes do not fit"):
        dora_weight_norm(torch.randn(5, 4), torch.randn(2, 3), torch.randn(5, 2), 1.0)
    with pytest.raises(ValueError, match="weight_sq_norm"):
        dora_weight_norm(
            torch.randn(5, 4), torch.randn(2, 4), torch.randn(5, 2), 1.0, torch.randn(4)
        )
