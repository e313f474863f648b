"""(IA)³: learned vectors that rescale activations (Liu et al. 2022,
https://arxiv.org/abs/2205.05638, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper
than In-Context Learning").

A frozen layer ``y = x Wᵀ + b`` gets one vector ``l``:

- on its output (attention keys and values, the paper's ``l_k``, ``l_v``):
  ``y = (x Wᵀ + b) ⊙ l``, ``l`` of shape (out,);
- on its input (the second feed-forward layer, the paper's ``l_ff``):
  ``y = (x ⊙ l) Wᵀ + b``, ``l`` of shape (in,).

Both fold into the weight: ``W ← diag(l) W``, ``b ← l ⊙ b`` (output) or ``W ← W diag(l)``
(input). Each product is taken in the wider of the two dtypes and rounded once to the
activation's dtype, as peft's ``IA3Layer`` does. Plain autograd ops: the backward is torch's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def ia3_scale(t: Tensor, scale: Tensor, dim: int = -1) -> Tensor:
    """``t ⊙ l`` along ``dim``: ``t`` (..., C, ...), ``scale`` (C,) broadcast over the other dims.

    The product is taken in ``promote_types(t.dtype, scale.dtype)`` and returned in ``t``'s dtype.
    """
    wide = torch.promote_types(t.dtype, scale.dtype)
    shape = [1] * t.dim()
    shape[dim] = scale.numel()
    return (t.to(wide) * scale.to(wide).reshape(shape)).to(t.dtype)


def ia3_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, scale: Tensor, feedforward: bool
) -> Tensor:
    """An (IA)³-scaled linear layer.

    Args:
        x: (..., in).
        weight: W (out, in), frozen.
        bias: b (out,) or None.
        scale: l, (in,) when ``feedforward`` else (out,).
        feedforward: scale the input (``y = (x ⊙ l) Wᵀ + b``) rather than the output
            (``y = (x Wᵀ + b) ⊙ l``).

    Returns:
        y (..., out) in ``x``'s dtype.
    """
    if feedforward:
        return F.linear(ia3_scale(x, scale), weight, bias)
    return ia3_scale(F.linear(x, weight, bias), scale)


def ia3_weight_factor(
    weight_shape: torch.Size | tuple[int, ...], scale: Tensor, feedforward: bool, groups: int = 1
) -> Tensor:
    """The factor ``f`` with ``W ⊙ f`` the merged weight, broadcastable to ``weight_shape``.

    ``weight_shape`` is (out, in) for a linear layer, (out, in / groups, *kernel) for a
    convolution. Output scaling: ``f[o] = l[o]`` on every row. Input scaling: ``f[o, j] =
    l[g(o)·in_g + j]`` where ``g(o)`` is the group of output channel ``o`` and ``in_g = in /
    groups`` (a grouped convolution sees only its group's input channels).
    """
    out_features, in_per_group = weight_shape[0], weight_shape[1]
    trailing = (1,) * (len(weight_shape) - 2)
    if not feedforward:
        return scale.reshape(out_features, 1, *trailing)
    per_group = scale.reshape(groups, 1, in_per_group)
    per_group = per_group.expand(groups, out_features // groups, in_per_group)
    return per_group.reshape(out_features, in_per_group, *trailing)


@torch.no_grad()
def ia3_merge(
    weight: Tensor,
    bias: Tensor | None,
    scale: Tensor,
    feedforward: bool,
    *,
    groups: int = 1,
    inverse: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The merged (or, with ``inverse``, unmerged) weight and bias, in at least float32.

    Merge: ``W ⊙ f`` and ``b ⊙ l`` (output scaling only; input scaling leaves ``b``); unmerge
    divides instead (exact up to the rounding of W's dtype). ``f`` as ``ia3_weight_factor``.

    Raises:
        ValueError: ``inverse`` with an entry of ``l`` equal to 0 (W is lost there).
    """
    wide = torch.promote_types(torch.promote_types(weight.dtype, scale.dtype), torch.float32)
    scale = scale.to(wide).flatten()
    if inverse and (scale == 0).any():
        raise ValueError(
            f"cannot unmerge (IA)³: entry {int((scale == 0).nonzero()[0])} of its vector is 0, "
            "so the merged weight lost what it scaled"
        )
    factor = ia3_weight_factor(weight.shape, scale, feedforward, groups)
    weight = weight.to(wide)
    merged_weight = weight / factor if inverse else weight * factor
    if bias is None or feedforward:
        return merged_weight, bias
    bias = bias.to(wide)
    return merged_weight, bias / scale if inverse else bias * scale
