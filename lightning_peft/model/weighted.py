"""``add_weighted_adapter``: a new LoRA adapter from a weighted combination of a model's named
adapters, as peft's. The checks, the plan (rank, sites, config of the new adapter) and the
computation work on ``Source``s (an adapter's config and factors by site), wherever the factors
live: a model's named adapters here, adapter directories in ``peft_format.combine``. The math
is ``lightning_peft.model.combine``.

The new adapter: LoRA with scale 1 (``α = r`` at every site; ``r`` as peft: the parts' common
rank, their sum for ``cat``, ``svd_rank`` or their largest for the SVD combinations), at the
union of the parts' sites, named in full in ``target_modules`` (peft writes the union of the
parts' ``target_modules``, which can select other modules when the parts' configs differ in
``exclude_modules`` or layer filters); dropout, adapter dtype and backend of the first part.

Where this differs from peft 0.21.2, on purpose (each refused or corrected by name, before any
change): a name already in use (peft returns silently, combining nothing); DoRA, ``lora_bias``
and ``modules_to_save`` parts (peft builds the new adapter with the first part's magnitude
re-initialised, a new zero or random bias, a fresh copy of the module: none of them combined);
rsLoRA parts (peft's new adapter keeps ``use_rslora``, so its update is ``√r`` times the
combination: here the scale is 1); pruning options given to a combination that does not prune,
or ``density`` missing where one does (peft ignores it, or fails mid-way); a single adapter with
a pruning combination (peft combines it linearly, ignoring ``density``); parts of different
ranks at a site for a factor-wise combination, and an SVD rank above ``min(out, in)`` (peft
fails mid-way, after adding the adapter; here the SVD factors are zero-padded).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_peft.methods.lora.base import LoRALayer
from lightning_peft.methods.lora.config import LoRAConfig
from lightning_peft.model.combine import (
    COMBINATIONS,
    FACTOR_WISE,
    ON_DELTA,
    RANDOM,
    SIGN_METHODS,
    USES_DENSITY,
    Part,
    combine_site,
    combined_rank,
)
from lightning_peft.model.injection import find_adapters, inject_adapters, plan_injection
from lightning_peft.model.sites import layer_named, sites

SVD_DRIVERS = (None, "gesvd", "gesvdj", "gesvda")


@dataclass
class Source:
    """One adapter to combine: its name, its config and its factors by site (module path)."""

    name: str
    config: object
    parts: dict[str, Part]


@dataclass
class CombinationPlan:
    """What ``combine`` will compute, checked: the combination peft runs (``linear`` for a
    single adapter), the new adapter's rank and config, its sites in combining order (the
    model's module order: the order of peft's RNG draws for dare), the options."""

    combination: str
    rank: int
    config: LoRAConfig
    sites: list[str]
    site_ranks: dict[str, int]
    options: dict = field(default_factory=dict)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_options(
    adapters: Sequence[str],
    weights: Sequence[float],
    combination_type: str,
    svd_rank: int | None,
    svd_clamp: float | None,
    svd_full_matrices: bool,
    svd_driver: str | None,
    density: float | None,
    majority_sign_method: str,
) -> str:
    """The combination to run (peft's: ``linear`` for one adapter), or ``ValueError`` naming
    the first bad argument."""
    if isinstance(adapters, str) or not adapters or not all(isinstance(a, str) for a in adapters):
        raise ValueError(f"adapters must be a non-empty list of adapter names, got {adapters!r}")
    if isinstance(weights, (str, bytes)) or len(weights) != len(adapters):
        raise ValueError(
            f"weights must give one number per adapter: {len(adapters)} adapters "
            f"{list(adapters)}, weights {weights!r}"
        )
    bad = [w for w in weights if not _is_number(w) or not math.isfinite(w)]
    if bad:
        raise ValueError(f"weights must be finite numbers, got {bad[0]!r}")
    if combination_type not in COMBINATIONS:
        raise ValueError(
            f"combination_type must be one of {COMBINATIONS}, got {combination_type!r}"
        )
    if majority_sign_method not in SIGN_METHODS:
        raise ValueError(
            f"majority_sign_method must be one of {SIGN_METHODS}, got {majority_sign_method!r}"
        )
    combination = combination_type
    if len(adapters) == 1:
        if combination in USES_DENSITY:
            raise ValueError(
                f"{combination!r} prunes and elects signs across adapters; with a single "
                "adapter peft combines linearly and ignores density: use 'linear'"
            )
        combination = "linear"
    if combination_type in USES_DENSITY:
        if not _is_number(density) or not 0 <= density <= 1:
            raise ValueError(
                f"{combination_type!r} needs density, the fraction of entries kept, in [0, 1]; "
                f"got {density!r}"
            )
        if combination_type in RANDOM and density == 0:
            raise ValueError(
                f"{combination_type!r} rescales the kept entries by 1/density: density 0 gives "
                "0/0 (peft's result is NaN); give a density in (0, 1]"
            )
    elif density is not None:
        raise ValueError(
            f"density is for {USES_DENSITY}; {combination_type!r} does not prune: leave it None"
        )
    svd_given = {
        "svd_rank": svd_rank is not None,
        "svd_clamp": svd_clamp is not None,
        "svd_full_matrices": svd_full_matrices is not True,
        "svd_driver": svd_driver is not None,
    }
    if combination_type not in ON_DELTA and any(svd_given.values()):
        given = next(name for name, on in svd_given.items() if on)
        raise ValueError(f"{given} is for {ON_DELTA}, not for {combination_type!r}")
    if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank < 1):
        raise ValueError(f"svd_rank must be an int >= 1 or None, got {svd_rank!r}")
    if svd_clamp is not None and (not _is_number(svd_clamp) or not 0 <= svd_clamp <= 1):
        raise ValueError(f"svd_clamp is a quantile in [0, 1] or None, got {svd_clamp!r}")
    if not isinstance(svd_full_matrices, bool):
        raise ValueError(f"svd_full_matrices must be a bool, got {svd_full_matrices!r}")
    if svd_driver not in SVD_DRIVERS:
        raise ValueError(f"svd_driver must be one of {SVD_DRIVERS}, got {svd_driver!r}")
    return combination


def check_sources(sources: Sequence[Source]) -> None:
    """Refuse, by adapter name, what cannot be combined into one LoRA adapter."""
    for source in sources:
        config, name = source.config, source.name
        if not isinstance(config, LoRAConfig):
            raise ValueError(
                f"adapter {name!r} is a {type(config).__name__} adapter; add_weighted_adapter "
                "combines LoRA adapters"
            )
        why = None
        if config.use_dora:
            why = "it is DoRA: its magnitude vector has no weighted combination"
        elif config.lora_bias:
            why = "it has lora_bias: B's bias is not combined (peft drops it)"
        elif config.modules_to_save:
            why = (
                f"it trains modules_to_save={config.modules_to_save!r} in full, which cannot be "
                "combined"
            )
        elif not source.parts:
            why = "it adapts no module"
        if why is not None:
            raise ValueError(f"cannot combine adapter {name!r}: {why}")


def plan_combination(
    sources: Sequence[Source],
    weights: Sequence[float],
    combination_type: str = "svd",
    site_order: Iterable[str] | None = None,
    *,
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> CombinationPlan:
    """Check everything and decide the new adapter; nothing is computed or changed.

    Args:
        sources: the adapters, in the order of ``weights``.
        site_order: every site in the order to combine them (a model's module order); by
            default the order in which the sources list them.

    Raises:
        ValueError: naming the first problem (``check_options``, ``check_sources``, parts of
            different ranks at a site for a factor-wise combination, an SVD driver off CUDA).
    """
    names = [s.name for s in sources]
    combination = check_options(
        names,
        weights,
        combination_type,
        svd_rank,
        svd_clamp,
        svd_full_matrices,
        svd_driver,
        density,
        majority_sign_method,
    )
    check_sources(sources)
    # peft's rank per adapter: the largest its config gives any module.
    ranks = [max([s.config.r, *s.config.rank_pattern.values()]) for s in sources]
    if combination in FACTOR_WISE and len(set(ranks)) != 1:
        raise ValueError(
            f"combination {combination!r} needs adapters of one rank, got "
            f"{dict(zip(names, ranks, strict=True))} (use 'cat' or an SVD combination)"
        )
    rank = combined_rank(ranks, combination, svd_rank)
    listed = [site for s in sources for site in s.parts]
    order = list(dict.fromkeys([*(site_order or []), *listed]))
    sites = [site for site in order if any(site in s.parts for s in sources)]
    site_ranks = {}
    for site in sites:
        here = {s.name: s.parts[site].rank for s in sources if site in s.parts}
        if combination in FACTOR_WISE and len(set(here.values())) != 1:
            raise ValueError(
                f"combination {combination!r} needs one rank per module; at {site!r} the "
                f"adapters have ranks {here}"
            )
        site_ranks[site] = next(iter(here.values())) if combination in FACTOR_WISE else rank
        if svd_driver is not None:
            device = next(s.parts[site].lora_A.device for s in sources if site in s.parts)
            if device.type != "cuda":
                raise ValueError(f"svd_driver={svd_driver!r} is for CUDA tensors, not {device}")
    first = sources[0].config
    patterns = {re.escape(site): r for site, r in site_ranks.items() if r != rank}
    config = LoRAConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=list(sites),
        lora_dropout=first.lora_dropout,
        rank_pattern=patterns,
        alpha_pattern=dict(patterns),
        adapter_dtype=first.adapter_dtype,
        backend=first.backend,
        base_model_name_or_path=first.base_model_name_or_path,
    )
    options = {
        "density": density,
        "majority_sign_method": majority_sign_method,
        "svd_clamp": svd_clamp,
        "svd_full_matrices": svd_full_matrices,
        "svd_driver": svd_driver,
    }
    return CombinationPlan(combination, rank, config, sites, site_ranks, options)


def combine(
    plan: CombinationPlan,
    sources: Sequence[Source],
    weights: Sequence[float],
    generator: torch.Generator | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """``{site: (A, B)}`` of the new adapter, site by site in ``plan.sites`` order (dare: the
    masks drawn from ``generator``, the global RNG if None, in that order)."""
    out = {}
    for site in plan.sites:
        present = [(s, w) for s, w in zip(sources, weights, strict=True) if site in s.parts]
        out[site] = combine_site(
            [s.parts[site] for s, _ in present],
            [w for _, w in present],
            plan.combination,
            plan.site_ranks[site],
            generator=generator,
            **plan.options,
        )
    return out


# -- on a model's named adapters ----------------------------------------------------------------


def model_sources(root: nn.Module, adapter_set, names: Sequence[str]) -> tuple[list, list[str]]:
    """(``Source`` of each named adapter of ``root``, every site in module order).

    Raises:
        ValueError: a name the model does not have; a layer without one factor pair (LoRA on
            multi-head attention holds two).
    """
    unknown = [name for name in names if name not in adapter_set.states]
    if unknown:
        raise ValueError(
            f"the model has no adapter named {unknown[0]!r}; its adapters are "
            f"{', '.join(map(repr, adapter_set.states))}"
        )
    placed = [(type(site).placement.target_path(path), site) for path, site in sites(root)]
    sources = []
    for name in dict.fromkeys(names):
        parts, config = {}, adapter_set.states[name].config
        for target, site in placed:
            layer = layer_named(site, name)
            if layer is None or not isinstance(config, LoRAConfig):
                continue
            if not isinstance(layer, LoRALayer) or len(layer.factor_names) != 2:
                raise ValueError(
                    f"cannot combine adapter {name!r}: its {type(layer).__name__} at {target!r} "
                    "holds more than one factor pair"
                )
            lora_A, lora_B = layer.factors()
            parts[target] = Part(lora_A.detach(), lora_B.detach(), layer.scaling)
        sources.append(Source(name, config, parts))
    by_name = {s.name: s for s in sources}
    return [by_name[name] for name in names], [target for target, _ in placed]


def add_weighted_adapter(
    model: nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> None:
    """Add the LoRA adapter ``adapter_name``, a weighted combination of the named adapters
    ``adapters``, as peft's ``add_weighted_adapter`` (same arguments; the module docstrings of
    ``model.combine`` and of this module give the math, what equals peft and what is refused).
    The new adapter is not active (``set_active_adapters(model, adapter_name)``) and, like
    every inactive adapter, frozen.

    Args:
        model: a model with named adapters (``inject_adapters(model, config, name=...)``), or
            a module above it.
        adapters, weights: the adapters to combine and their weights (any sign), one each.
        adapter_name: the new adapter's name (not in use).
        combination_type: ``svd`` (default, as peft), ``linear``, ``cat``, ``ties``,
            ``ties_svd``, ``dare_linear``, ``dare_ties``, ``dare_linear_svd``,
            ``dare_ties_svd``, ``magnitude_prune``, ``magnitude_prune_svd``.
        svd_rank, svd_clamp, svd_full_matrices, svd_driver: the SVD combinations' rank (default:
            the largest of the adapters'), clamp quantile, and ``torch.linalg.svd`` options.
        density: the fraction of entries kept by the pruning combinations, in [0, 1].
        majority_sign_method: ``"total"`` or ``"frequency"`` (TIES's sign election).
        generator: the RNG of the dare masks (None: the global one, as peft).

    Raises:
        ValueError: naming the first problem, before the model changes.
    """
    found = find_adapters(model)
    if found is None:
        raise ValueError("the model has no adapters (inject_adapters was not called on it)")
    _, root, adapter_set = found
    check_options(
        adapters,
        weights,
        combination_type,
        svd_rank,
        svd_clamp,
        svd_full_matrices,
        svd_driver,
        density,
        majority_sign_method,
    )
    if adapter_name in adapter_set.states:
        raise ValueError(
            f"the model already has an adapter named {adapter_name!r}; choose another name, or "
            f"delete_adapter(model, {adapter_name!r}) first (peft's add_weighted_adapter "
            "returns without combining anything there)"
        )
    sources, order = model_sources(root, adapter_set, adapters)
    plan = plan_combination(
        sources,
        weights,
        combination_type,
        order,
        svd_rank=svd_rank,
        svd_clamp=svd_clamp,
        svd_full_matrices=svd_full_matrices,
        svd_driver=svd_driver,
        density=density,
        majority_sign_method=majority_sign_method,
    )
    plan_injection(root, plan.config, adapter_name)  # every refusal of the injection, first
    factors = combine(plan, sources, weights, generator)
    inject_adapters(root, plan.config, adapter_name)
    with torch.no_grad():
        for path, site in sites(root):
            layer = layer_named(site, adapter_name)
            if layer is not None:
                new = factors[type(site).placement.target_path(path)]
                for tensor, value in zip(layer.factors(), new, strict=True):
                    tensor.copy_(value.to(tensor.dtype))
