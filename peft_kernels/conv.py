"""LoRA and DoRA on convolutions (``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``), with plain
autograd torch ops.

Shapes, as peft's conv layers hold them (N = 1, 2 or 3 spatial dimensions, G = ``groups``):

- ``x`` (batch, in, *spatial); ``weight`` W (out, in/G, *k), frozen; ``bias`` (out,) or None;
- ``lora_A`` A (r, in, *k): a convolution over all ``in`` channels (no groups) with W's kernel
  size, stride, padding and dilation;
- ``lora_B`` B (out, r/G, 1, …, 1): a 1×…×1 convolution with W's groups;
- ``magnitude`` m (out,) (DoRA).

LoRA: ``y = conv(x, W) + b + s·(conv(conv(dropout(x), A), B) + b_B)`` (``b_B``: B's bias,
``lora_bias``, optional).

Dtypes, as ``lora_linear``'s: ``x``, ``weight`` and ``bias`` share the compute dtype; the adapter
tensors (``lora_A``, ``lora_B``, ``lora_bias``, ``magnitude``) share the adapter dtype, the compute
dtype or wider. float32 adapters on a bfloat16 base run the whole adapter branch in float32 (x
cast up, as peft's ``_cast_input_dtype`` does); the base convolution runs in x's dtype, the two
are added in the adapter dtype and the sum is rounded to x's dtype once, as peft's ``_ConvNd``.

With G = 1 the update is one convolution, ``ΔW[o] = s·Σ_j B[o, j]·A[j]`` (``conv_delta_weight``),
so it merges into W. With G > 1 output channel o (in group g) reads the A-channels of group g,
which see *all* input channels: the update is dense across groups and has no place in the
grouped W (peft refuses to merge it too).

DoRA's norm is per output channel over the flattened kernel, ``n_o = ‖W[o] + ΔW[o]‖``, as peft's
``_DoraConvNdLayer`` computes it (``conv_dora_weight_norm``; for G > 1 in peft's layout, see
there). LoRA: Hu et al. 2021, https://arxiv.org/abs/2106.09685; DoRA: Liu et al. 2024,
https://arxiv.org/abs/2402.09353 (norm detached, §4.3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from peft_kernels._validation import _ADAPTER_DTYPES, check_frozen_and_scalars
from peft_kernels.norm import dora_weight_norm, norm_dtype, weight_row_sq_norm

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _conv_for(weight: Tensor):
    conv = _CONV.get(weight.dim() - 2)
    if conv is None:
        raise ValueError(
            "weight must be 3-, 4- or 5-D (out, in/groups, *kernel) for a 1-, 2- or 3-D "
            f"convolution, got shape {tuple(weight.shape)}"
        )
    return conv


def _check_factors(weight: Tensor, lora_A: Tensor, lora_B: Tensor, groups: int) -> None:
    """Shapes of W, A and B for ``groups``; raises ``ValueError`` naming the mismatch."""
    _conv_for(weight)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    out_channels, kernel = weight.shape[0], tuple(weight.shape[2:])
    in_channels = weight.shape[1] * groups
    rank = lora_A.shape[0] if lora_A.dim() else 0
    ones = (1,) * len(kernel)
    if rank == 0:
        raise ValueError("rank r must be >= 1, but lora_A has 0 output channels")
    if tuple(lora_A.shape) != (rank, in_channels, *kernel):
        raise ValueError(
            f"lora_A must be (r, in, *kernel) = (r, {in_channels}, {', '.join(map(str, kernel))}),"
            f" got {tuple(lora_A.shape)}"
        )
    if rank % groups or out_channels % groups:
        raise ValueError(
            f"r = {rank} and out = {out_channels} must be multiples of groups = {groups}"
        )
    if tuple(lora_B.shape) != (out_channels, rank // groups, *ones):
        raise ValueError(
            f"lora_B must be (out, r/groups, {', '.join('1' * len(kernel))}) = "
            f"({out_channels}, {rank // groups}, ...), got {tuple(lora_B.shape)}"
        )


def _check_inputs(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    groups: int,
    scaling: float,
    dropout_p: float,
    magnitude: Tensor | None = None,
    lora_bias: Tensor | None = None,
) -> None:
    base = {"x": x, "weight": weight} | ({} if bias is None else {"bias": bias})
    adapter = {"lora_A": lora_A, "lora_B": lora_B}
    adapter.update(
        {k: v for k, v in (("lora_bias", lora_bias), ("magnitude", magnitude)) if v is not None}
    )
    named = base | adapter
    for name, tensor in named.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    for group, like in ((base, "x"), (adapter, "lora_A")):
        for name, tensor in group.items():
            if tensor.dtype != group[like].dtype:
                raise TypeError(
                    f"{name} has dtype {tensor.dtype} but {like} has {group[like].dtype}; "
                    "cast them to one dtype"
                )
    if (x.dtype, lora_A.dtype) not in _ADAPTER_DTYPES:
        raise TypeError(
            f"the adapter tensors have dtype {lora_A.dtype}, narrower than x's {x.dtype} (or "
            "not floating): use x's dtype or a wider one"
        )
    for name, tensor in named.items():
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}")
    _check_factors(weight, lora_A, lora_B, groups)
    spatial = weight.dim() - 2
    if x.dim() != spatial + 2 or x.shape[1] != weight.shape[1] * groups:
        raise ValueError(
            f"x must be (batch, in = {weight.shape[1] * groups}, *{spatial} spatial dims) for "
            f"weight {tuple(weight.shape)} with groups={groups}, got {tuple(x.shape)}"
        )
    out_channels = weight.shape[0]
    for name, vector in (("bias", bias), ("lora_bias", lora_bias)):
        if vector is not None and tuple(vector.shape) != (out_channels,):
            raise ValueError(
                f"{name} must be (out,) = ({out_channels},), got {tuple(vector.shape)}"
            )
    if magnitude is not None and tuple(magnitude.shape) != (out_channels,):
        raise ValueError(
            f"magnitude must be (out,) = ({out_channels},), got {tuple(magnitude.shape)}"
        )
    check_frozen_and_scalars(weight, scaling, dropout_p)


def _lora_path(
    x: Tensor, lora_A: Tensor, lora_B: Tensor, lora_bias, stride, padding, dilation, groups
):
    """``conv(conv(x, A), B) + b_B``: (batch, in, *spatial) -> (batch, out, *spatial_out), in
    the adapter dtype (x cast up to it)."""
    conv = _conv_for(lora_A)
    after_A = conv(x.to(lora_A.dtype), lora_A, None, stride, padding, dilation)
    return conv(after_A, lora_B, lora_bias, 1, 0, 1, groups)


def lora_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    *,
    training: bool = True,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] | str = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
    lora_bias: Tensor | None = None,
) -> Tensor:
    """LoRA convolution: ``y = conv(x, W) + b + scaling · (conv(conv(dropout(x), A), B) + b_B)``.

    Args:
        x: (batch, in, *spatial), N = 1, 2 or 3 spatial dimensions.
        weight: W (out, in/groups, *kernel), frozen (must not require grad), x's dtype.
        bias: (out,) or None, x's dtype; it gets a gradient when it requires grad.
        lora_A: A (r, in, *kernel), applied with ``stride``, ``padding`` and ``dilation``; x's
            dtype or wider (e.g. float32 on a bfloat16 base: the branch then runs in float32).
        lora_B: B (out, r/groups, 1, …): a 1×…×1 convolution with ``groups``; A's dtype.
        scaling: s, ``lora_alpha / r`` (rsLoRA: ``lora_alpha / sqrt(r)``).
        dropout_p: dropout probability on the adapter's input; active only when ``training``.
        stride, padding, dilation, groups: W's, as in ``torch.nn.functional.conv2d``.
        lora_bias: b_B (out,), B's bias (peft's ``lora_bias``), A's dtype, or None.

    Returns:
        y (batch, out, *spatial_out) in x's dtype: ``conv(x, W) + b`` in x's dtype, the branch
        in the adapter dtype, their sum rounded once (peft's ``_ConvNd``).

    Raises:
        TypeError / ValueError: bad dtypes, shapes, devices, ``r == 0``, ``r`` or ``out`` not a
            multiple of ``groups``, a weight that requires grad, ``dropout_p`` outside [0, 1).
    """
    _check_inputs(x, weight, bias, lora_A, lora_B, groups, scaling, dropout_p, None, lora_bias)
    geometry = (stride, padding, dilation)
    base = _conv_for(weight)(x, weight, bias, *geometry, groups)
    x_adapter = x.to(lora_A.dtype)
    x_dropped = F.dropout(x_adapter, dropout_p, training) if dropout_p > 0 else x_adapter
    lora = _lora_path(x_dropped, lora_A, lora_B, lora_bias, *geometry, groups) * scaling
    return (base + lora).to(x.dtype)


def dora_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    *,
    training: bool = True,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] | str = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
    weight_sq_norm: Tensor | None = None,
) -> Tensor:
    """DoRA convolution, ``n = conv_dora_weight_norm(W, A, B, s)`` (out,) held constant in backward.

    With ``g = m / n`` per output channel and ``L(x) = conv(conv(x, A), B)``:

    - dropout off (``dropout_p == 0`` or not ``training``): ``y = g ⊙ (conv(x, W) + s·L(x)) + b``;
    - dropout on, exactly as peft: ``y = conv(x, W) + b + (g − 1) ⊙ conv(x̃, W) + g ⊙ s·L(x̃)``
      with ``x̃ = dropout(x)``.

    The convolutions with W run in x's dtype (x̃ rounded to it), everything else in the adapter
    dtype (at least that of n), and y is rounded to x's dtype once.

    Args:
        x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, stride, padding,
            dilation, groups: as in ``lora_conv``.
        magnitude: m (out,), A's dtype.
        weight_sq_norm: optional cached ``‖W[o]‖²`` (out,) (``weight_row_sq_norm`` of W
            flattened to (out, -1)).

    Returns:
        y (batch, out, *spatial_out) in x's dtype.
    """
    _check_inputs(x, weight, bias, lora_A, lora_B, groups, scaling, dropout_p, magnitude)
    norm = conv_dora_weight_norm(
        weight, lora_A, lora_B, scaling, groups=groups, weight_sq_norm=weight_sq_norm
    )
    channel = (1, -1) + (1,) * (weight.dim() - 2)
    wide = torch.promote_types(lora_A.dtype, norm.dtype)
    scale = (magnitude.to(wide) / norm.to(wide)).view(channel)
    geometry = (stride, padding, dilation)
    conv = _conv_for(weight)
    if training and dropout_p > 0:
        x_dropped = F.dropout(x.to(lora_A.dtype), dropout_p, True)
        lora = _lora_path(x_dropped, lora_A, lora_B, None, *geometry, groups) * scaling
        base_dropped = conv(x_dropped.to(x.dtype), weight, None, *geometry, groups)
        y = conv(x, weight, bias, *geometry, groups) + (scale - 1) * base_dropped + scale * lora
        return y.to(x.dtype)
    lora = _lora_path(x, lora_A, lora_B, None, *geometry, groups) * scaling
    y = scale * (conv(x, weight, None, *geometry, groups) + lora)
    return (y if bias is None else y + bias.view(channel)).to(x.dtype)


def conv_dora_weight_norm(
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    *,
    groups: int = 1,
    weight_sq_norm: Tensor | None = None,
) -> Tensor:
    """DoRA's norm per output channel, ``n_o = ‖W[o] + s·ΔW[o]‖₂`` over the flattened kernel,
    detached (a constant for backward), without building ΔW.

    ``ΔW`` is laid out as peft's ``_DoraConvNdLayer`` lays it: ``(B.reshape(-1, r) @
    A.reshape(r, -1)).reshape(W.shape)``. With ``groups == 1`` that is the update itself
    (``conv_delta_weight``) and the norm is ``dora_weight_norm`` of the flattened matrices. With
    ``groups = G > 1`` the update is dense across groups and does not fit W's shape; peft's
    reshape then pairs row o = q·G + g of W (flattened to (out, c), c = in·k/G) with
    ``B.reshape(out/G, r)[q] @ A.reshape(r, G, c)[:, g]``. That is not the norm of the adapted
    layer's weight, but it is peft's DoRA for grouped convolutions, kept so that adapters move
    between the two packages with the same outputs. Computed factored per (q, g), as
    ``peft_kernels.norm`` does for linear layers.

    Args:
        weight: W (out, in/groups, *kernel).
        lora_A: A (r, in, *kernel). lora_B: B (out, r/groups, 1, …).
        scaling: s.
        groups: W's groups.
        weight_sq_norm: optional cached ``‖W[o]‖²`` (out,).

    Returns:
        n (out,) in at least float32; squared terms are clamped at 0 before the square root.
    """
    _check_factors(weight, lora_A, lora_B, groups)
    out_channels, rank = weight.shape[0], lora_A.shape[0]
    if weight_sq_norm is not None and tuple(weight_sq_norm.shape) != (out_channels,):
        raise ValueError(
            f"weight_sq_norm must be (out,) = ({out_channels},), got {tuple(weight_sq_norm.shape)}"
        )
    weight, lora_A, lora_B = weight.detach(), lora_A.detach(), lora_B.detach()
    if groups == 1:
        return dora_weight_norm(
            weight.reshape(out_channels, -1),
            lora_A.reshape(rank, -1),
            lora_B.reshape(out_channels, rank),
            scaling,
            weight_sq_norm,
        )
    dtype = torch.promote_types(norm_dtype(weight.dtype), norm_dtype(lora_A.dtype))
    rows = out_channels // groups
    w = weight.reshape(rows, groups, -1)  # w[q, g] = W[q·G + g] flattened
    a = lora_A.reshape(rank, groups, -1)  # a[:, g] = A's flattened columns g·c … (g+1)·c
    b = lora_B.reshape(rows, rank).to(dtype)  # peft's B.view(-1, r)
    if weight_sq_norm is None:
        weight_sq_norm = weight_row_sq_norm(weight.reshape(out_channels, -1))
    product_dtype = torch.promote_types(w.dtype, a.dtype)  # fp32 adapters stay fp32
    wa = torch.einsum("qgc,rgc->qgr", w.to(product_dtype), a.to(product_dtype)).to(dtype)
    cross = (wa * b[:, None, :]).sum(-1)  # ⟨W[o], B'[q] a_g⟩
    a = a.to(dtype)
    aat = torch.einsum("rgc,sgc->grs", a, a)  # (G, r, r)
    quadratic = torch.einsum("qr,grs,qs->qg", b, aat, b)  # B'[q] a_g a_gᵀ B'[q]ᵀ
    sq_norm = (
        weight_sq_norm.to(dtype).reshape(rows, groups)
        + (2.0 * scaling) * cross
        + (scaling * scaling) * quadratic
    )
    return sq_norm.clamp_min(0.0).sqrt().reshape(out_channels)


def conv_delta_weight(lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """The update ``s·ΔW`` (out, in, *kernel) of an ungrouped LoRA convolution:
    ``ΔW[o] = Σ_j B[o, j]·A[j]``, so that ``conv(x, W + s·ΔW) = conv(x, W) + s·L(x)``.

    Args:
        lora_A: A (r, in, *kernel). lora_B: B (out, r, 1, …) (groups = 1).

    Raises:
        ValueError: B is the factor of a grouped convolution (its update does not fit W).
    """
    rank, out_channels = lora_A.shape[0], lora_B.shape[0]
    if lora_B.shape[1] != rank:
        raise ValueError(
            f"lora_B {tuple(lora_B.shape)} belongs to a grouped convolution (r/groups = "
            f"{lora_B.shape[1]} of r = {rank}): its update is dense across groups and has no "
            "place in the grouped weight, so it cannot be merged"
        )
    delta = lora_B.reshape(out_channels, rank) @ lora_A.reshape(rank, -1)
    return (delta * scaling).reshape(out_channels, *lora_A.shape[1:])
