"""Weighted combinations of LoRA adapters at one site: pure functions over tensors.

peft 0.21.2's ``add_weighted_adapter`` combines adapters k = 1..n, each holding at a module the
factors ``A_k`` (r_k, in) and ``B_k`` (out, r_k) with scale ``s_k`` (``ΔW_k = s_k·B_k A_k``),
with weights ``w_k``, into one new adapter whose scale is 1 (``α = r``). Two families:

- **factor-wise** (``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``;
  every ``r_k`` equal): A and B are merged separately, A's with weights ``sign(w_k s_k)·√|w_k s_k|``
  and B's with ``√|w_k s_k|``, so ``B A = (Σ √|w s|·B_k)(Σ ±√|w s|·A_k)``, which is *not*
  ``Σ w_k ΔW_k`` for n > 1 (cross terms; peft calls it a rough approximation);
- **on ΔW** (``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``,
  ``magnitude_prune_svd``): the same mergers applied to the full ``ΔW_k``, then the truncated
  SVD ``ΔW ≈ U_r S_r V_rᵀ`` gives ``B = U_r S_r``, ``A = V_rᵀ`` (optionally clamped to the
  ``svd_clamp`` quantile of their entries); exact for ``svd`` when r ≥ rank(Σ w_k ΔW_k);
- ``cat``: ``A = [w_1 s_1 A_1; …; w_n s_n A_n]``, ``B = [B_1 … B_n]`` (rank Σ r_k): exactly
  ``Σ w_k ΔW_k``.

The mergers on a list of same-shaped task tensors ``t_k`` with weights ``λ_k``
(Yadav et al. 2023, TIES, https://arxiv.org/abs/2306.01708; Yu et al. 2024, DARE,
https://arxiv.org/abs/2311.03099): ``linear`` ``Σ λ_k t_k``; ``magnitude_prune`` keeps the
``⌊density·numel⌋`` largest ``|t_k|`` of each tensor then sums; ``ties`` prunes so, elects a sign
per entry (``"total"``: the sign of ``Σ_k t_k``; ``"frequency"``: of ``Σ_k sign(t_k)``; 0 counts
as +) and averages the weighted entries that carry that sign (a disjoint mean); ``dare_linear``
/ ``dare_ties`` replace the magnitude pruning by a random one, each entry kept with probability
``density`` and rescaled by ``1/density``.

Exactness against peft (float32, CPU): every function here does the same tensor operations in
the same order and dtypes as peft (the weights as a float32 tensor, stack-then-sum, ``topk`` for
the magnitude mask, ``torch.linalg.svd`` with the same ``full_matrices``), so the results are
equal bit for bit for ``linear``, ``cat``, ``ties``, ``magnitude_prune`` and the ``*_svd``
variants (the SVD of the same matrix by the same LAPACK call is deterministic; ``U·S`` by
broadcasting equals peft's ``U @ diag(S)``). A convolution's ΔW is taken as ``B A`` on the
flattened kernel, where peft convolves the factors: equal up to rounding.

Random (``dare_*``): the mask of each task tensor is ``torch.bernoulli(full_like(t, density),
generator=generator)``. peft draws from the global RNG, one mask per task tensor: factor-wise,
at each site the A's of the adapters present in order, then their B's; on ΔW, one per adapter
present. Passing ``generator`` set to the global RNG's state at peft's first draw (or leaving
it None after the same ``torch.manual_seed`` and the same earlier draws) gives peft's masks, and
then the same result bit for bit, provided the sites are combined in peft's order (the model's
module order). ``density >= 1`` draws nothing (no pruning), as in peft.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

FACTOR_WISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
ON_DELTA = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATIONS = (*FACTOR_WISE, "cat", *ON_DELTA)
USES_DENSITY = tuple(c for c in COMBINATIONS if c.startswith(("ties", "dare", "magnitude")))
USES_SIGN = tuple(c for c in COMBINATIONS if "ties" in c)
RANDOM = tuple(c for c in COMBINATIONS if c.startswith("dare"))
SIGN_METHODS = ("total", "frequency")


@dataclass(frozen=True)
class Part:
    """One adapter at one site: ``ΔW = scaling · B A``.

    ``lora_A``: (r, in, *k) (a convolution's kernel dims ``k``; an embedding's ``in`` is its
    vocabulary); ``lora_B``: (out, r, *ones).
    """

    lora_A: Tensor
    lora_B: Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]


# -- mergers of task tensors --------------------------------------------------------------------


def magnitude_prune_tensor(tensor: Tensor, density: float) -> Tensor:
    """``tensor`` with all but its ``⌊density·numel⌋`` largest-magnitude entries set to 0
    (``density >= 1``: unchanged)."""
    if density >= 1:
        return tensor
    keep = int(density * tensor.numel())
    mask = torch.zeros_like(tensor).reshape(-1)
    mask[torch.topk(tensor.abs().reshape(-1), k=keep, largest=True).indices] = 1
    return tensor * mask.reshape(tensor.shape)


def random_prune_tensor(
    tensor: Tensor, density: float, generator: torch.Generator | None = None
) -> Tensor:
    """DARE: each entry kept with probability ``density`` (one ``torch.bernoulli`` draw of
    ``tensor``'s shape and dtype from ``generator``, the global RNG if None) and rescaled by
    ``1/density``, so the expectation is ``tensor`` (``density >= 1``: unchanged, no draw)."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def majority_sign_mask(stacked: Tensor, method: str = "total") -> Tensor:
    """For stacked task tensors (n, …): True where ``t_k`` carries the elected sign.

    The sign of ``Σ_k t_k`` (``"total"``) or of ``Σ_k sign(t_k)`` (``"frequency"``), + on ties;
    a zero entry carries no sign and is never counted.
    """
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else signs.sum(dim=0)
    elected = torch.where(votes >= 0, 1, -1)
    return signs == elected


def disjoint_mean(weighted: Tensor, mask: Tensor) -> Tensor:
    """Mean over dim 0 of the entries of ``weighted`` (n, …) where ``mask`` holds (0 where none
    does)."""
    kept = (weighted * mask).sum(dim=0)
    return kept / torch.clamp(mask.sum(dim=0), min=1.0)


def merge_tensors(
    tensors: Sequence[Tensor],
    weights: Tensor,
    merger: str,
    density: float | None = None,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Merge same-shaped task tensors with ``weights`` (n,) by ``merger``: ``linear``,
    ``magnitude_prune``, ``ties``, ``dare_linear`` or ``dare_ties`` (the module docstring gives
    the math). dare draws one mask per tensor, in order."""
    if merger in ("magnitude_prune", "ties"):
        tensors = [magnitude_prune_tensor(t, density) for t in tensors]
    elif merger in ("dare_linear", "dare_ties"):
        tensors = [random_prune_tensor(t, density, generator) for t in tensors]
    elif merger != "linear":
        raise ValueError(f"unknown merger {merger!r}")
    stacked = torch.stack(list(tensors), dim=0)
    weighted = stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))
    if merger in ("ties", "dare_ties"):
        return disjoint_mean(weighted, majority_sign_mask(stacked, majority_sign_method))
    return weighted.sum(dim=0)


# -- one site -----------------------------------------------------------------------------------


def combined_rank(ranks: Sequence[int], combination: str, svd_rank: int | None = None) -> int:
    """The new adapter's rank from the parts' ranks (peft's rule): factor-wise, their common
    rank; ``cat``, their sum; on ΔW, ``svd_rank`` or their maximum."""
    if combination in FACTOR_WISE:
        if len(set(ranks)) != 1:
            raise ValueError(
                f"combination {combination!r} needs adapters of one rank, got ranks "
                f"{list(ranks)} (use 'cat' or an SVD combination)"
            )
        return ranks[0]
    if combination == "cat":
        return sum(ranks)
    if combination in ON_DELTA:
        return svd_rank or max(ranks)
    raise ValueError(f"unknown combination {combination!r}; choose from {COMBINATIONS}")


def combine_site(
    parts: Sequence[Part],
    weights: Sequence[float],
    combination: str,
    rank: int,
    *,
    density: float | None = None,
    majority_sign_method: str = "total",
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """``(A, B)`` of the combined adapter at one site (its scale is 1: ``ΔW = B A``).

    Args:
        parts: the adapters present at the site, in the order of ``weights``.
        weights: ``w_k``, one per part (any sign).
        combination: one of ``COMBINATIONS``.
        rank: the new adapter's rank (``combined_rank``); ``cat`` pads with zero rows/columns
            when parts are missing at this site; an SVD combination pads when ``rank`` exceeds
            ``min(out, in)`` (peft fails there).
        density, majority_sign_method: for the pruning and sign-electing combinations.
        svd_clamp: a quantile q in [0, 1]; A and B entries are clamped to ±(q-quantile of all
            their entries); svd_full_matrices, svd_driver: passed to ``torch.linalg.svd``.
        generator: the RNG of the dare masks, on the factors' device (None: the global one,
            as peft).

    Returns:
        A (rank, in, *k) and B (out, rank, *ones): the factor-wise ones in the parts' dtype,
        the others in the dtype of the computation (at least float32).
    """
    if not parts or len(parts) != len(weights):
        raise ValueError(f"{len(parts)} parts and {len(weights)} weights: need as many, >= 1")
    if combination == "cat":
        return _cat(parts, weights, rank)
    if combination in FACTOR_WISE:
        return _factor_wise(parts, weights, combination, density, majority_sign_method, generator)
    if combination in ON_DELTA:
        merger = "linear" if combination == "svd" else combination.removesuffix("_svd")
        deltas = [_delta(p) for p in parts]
        delta = merge_tensors(
            deltas,
            torch.tensor(list(weights)).to(deltas[0].device),
            merger,
            density,
            majority_sign_method,
            generator,
        )
        return truncated_svd_factors(
            delta, rank, parts[0], svd_clamp, svd_full_matrices, svd_driver
        )
    raise ValueError(f"unknown combination {combination!r}; choose from {COMBINATIONS}")


def _cat(parts: Sequence[Part], weights: Sequence[float], rank: int) -> tuple[Tensor, Tensor]:
    lora_A = torch.cat([p.lora_A * w * p.scaling for p, w in zip(parts, weights, strict=True)])
    lora_B = torch.cat([p.lora_B for p in parts], dim=1)
    if lora_A.shape[0] > rank:
        raise ValueError(f"cat: the parts' ranks sum to {lora_A.shape[0]} > rank {rank}")
    new_A = lora_A.new_zeros((rank, *lora_A.shape[1:]))
    new_B = lora_B.new_zeros((lora_B.shape[0], rank, *lora_B.shape[2:]))
    new_A[: lora_A.shape[0]] = lora_A
    new_B[:, : lora_B.shape[1]] = lora_B
    return new_A, new_B


def _factor_wise(parts, weights, merger, density, sign_method, generator):
    ranks = {p.rank for p in parts}
    if len(ranks) != 1:
        raise ValueError(f"{merger} needs parts of one rank at a site, got ranks {sorted(ranks)}")
    scaled = [w * p.scaling for p, w in zip(parts, weights, strict=True)]
    # √|w s| on both factors, its sign on A only: B A carries w·s.
    on_A = torch.tensor([math.sqrt(abs(v)) * (1 if v >= 0 else -1) for v in scaled])
    on_B = torch.tensor([math.sqrt(abs(v)) for v in scaled])
    dtype = parts[0].lora_A.dtype
    merged = [
        merge_tensors(
            [getattr(p, name) for p in parts],
            factor_weights.to(parts[0].lora_A.device),
            merger,
            density,
            sign_method,
            generator,
        ).to(dtype)
        for name, factor_weights in (("lora_A", on_A), ("lora_B", on_B))
    ]
    return merged[0], merged[1]


def _matrices(part: Part) -> tuple[Tensor, Tensor]:
    """A as (r, in·k…) and B as (out, r)."""
    lora_A, lora_B = part.lora_A, part.lora_B
    rank = lora_A.shape[0]
    if lora_B.shape[1] != rank or any(d != 1 for d in lora_B.shape[2:]):
        raise ValueError(
            f"lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} are not a product "
            "B·A (a grouped convolution?)"
        )
    return lora_A.reshape(rank, -1), lora_B.reshape(lora_B.shape[0], rank)


def _delta(part: Part) -> Tensor:
    """``ΔW = (B A)·s`` (out, in·k…), in at least float32."""
    lora_A, lora_B = _matrices(part)
    dtype = torch.promote_types(lora_A.dtype, torch.float32)
    return (lora_B.to(dtype) @ lora_A.to(dtype)) * part.scaling


def clamp_quantile(lora_A: Tensor, lora_B: Tensor, quantile: float) -> tuple[Tensor, Tensor]:
    """Both factors clamped to ``±h``, h the ``quantile`` of all their entries together."""
    high = torch.quantile(torch.cat([lora_B.flatten(), lora_A.flatten()]), quantile)
    return lora_A.clamp(-high, high), lora_B.clamp(-high, high)


def truncated_svd_factors(
    delta: Tensor,
    rank: int,
    like: Part,
    clamp: float | None = None,
    full_matrices: bool = True,
    driver: str | None = None,
) -> tuple[Tensor, Tensor]:
    """``A = V_rᵀ`` (rank, in·k… reshaped as ``like.lora_A``), ``B = U_r S_r`` (out, rank, …)
    from the SVD of ``delta`` (out, in·k…); zero rows/columns beyond ``min(out, in)``."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    kept = min(rank, S.shape[0])
    lora_B = U[:, :kept] * S[:kept]
    lora_A = Vh[:kept, :]
    if clamp is not None:
        lora_A, lora_B = clamp_quantile(lora_A, lora_B, clamp)
    new_A = lora_A.new_zeros((rank, lora_A.shape[1]))
    new_B = lora_B.new_zeros((lora_B.shape[0], rank))
    new_A[:kept], new_B[:, :kept] = lora_A, lora_B
    tail_B = like.lora_B.shape[2:]
    return (
        new_A.reshape(rank, *like.lora_A.shape[1:]),
        new_B.reshape(new_B.shape[0], rank, *tail_B),
    )
