"""What LoRA's convolution and embedding layers share: a layer around one frozen base weight W,
two factors whose product (reshaped) is the update, an optional ``lora_bias`` on B, and LoRA /
DoRA as variant objects (peft's ``LoraVariant``) that never look at the layer type.

A layer class (``LoRAConv``, ``LoRAEmbedding``) declares its factors' names and shapes, its
DoRA magnitude's shape (peft's), how to initialise the factors, what it refuses, and the hooks
the variants call:

- ``lora_output(x)`` / ``dora_output(x, weight_sq_norm)``: the forward, from ``kernels``;
- ``base_output(x)``: the base layer's forward (disabled or merged);
- ``delta_weight()``: ``s·ΔW`` in W's shape, in at least float32 (merge);
- ``dora_norm(weight_sq_norm)``: DoRA's norm n, one entry per magnitude entry, detached;
- ``row_sq_norms(weight)``: ``‖W‖²`` along the axis DoRA normalises (cached by the variant);
- ``per_row(v)``: a vector of those entries shaped to broadcast against W.

The layer registers the base module's own parameters and buffers under the same names, so the
frozen state-dict keys do not change, and ``unwrap()`` hands them back.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from lightning_peft.config import LoRAConfig
from lightning_peft.methods.base import AdapterLayer

# -- variants -----------------------------------------------------------------------------------


class WeightLoRAVariant:
    """Plain LoRA, and the interface of variants for ``LoRAWeightLayer`` (what
    ``lora.LoRAVariant`` is for ``LoRALinear``, written against the layer hooks instead of an
    (out, in) matrix): what a variant adds lives on the layer under the names it declares
    (``parameter_names`` / ``buffer_names``); the variant is stateless."""

    name = "LoRA"
    parameter_names: tuple[str, ...] = ()
    buffer_names: tuple[str, ...] = ()

    def extra_shapes(self, magnitude_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return {}

    def check(self, layer_class: type[LoRAWeightLayer], module: nn.Module, config, name) -> None:
        """Raise ``ValueError`` naming ``name`` if the variant cannot adapt ``module``."""

    def create(self, layer: LoRAWeightLayer, adapter_dtype: torch.dtype) -> None:
        """Register the variant's tensors on ``layer`` (uninitialised)."""

    def init(self, layer: LoRAWeightLayer) -> None:
        """Initialise the variant's tensors, once the factors are set."""

    def weight_changed(self, layer: LoRAWeightLayer) -> None:
        """W changed in place (merge, unmerge, a state-dict load): refresh what depends on it."""

    def forward(self, layer: LoRAWeightLayer, x: Tensor) -> Tensor:
        return layer.lora_output(x)

    def merge(self, layer: LoRAWeightLayer, weight: Tensor) -> Tensor:
        """The merged weight, from W in at least float32: ``W + s·ΔW``."""
        return weight + layer.delta_weight()

    def unmerge(self, layer: LoRAWeightLayer, merged: Tensor) -> Tensor:
        return merged - layer.delta_weight()


class WeightDoRAVariant(WeightLoRAVariant):
    """DoRA: ``y = (m/n) ⊙ (base + s·ΔW) + b`` per magnitude entry, n held constant in backward.

    ``‖W‖²`` along the normalised axis is kept in the non-persistent buffer ``weight_sq_norm``,
    refreshed when W changes through this package (merge, unmerge, ``load_state_dict``) and, in
    eager mode, when W's version counter moves. An all-zero slice of W is refused at injection:
    the magnitude would start at 0 and m/n be 0/0 (peft gives NaN there).
    """

    name = "DoRA"
    parameter_names = ("lora_magnitude",)
    buffer_names = ("weight_sq_norm",)

    def extra_shapes(self, magnitude_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return {"lora_magnitude": magnitude_shape}

    def check(self, layer_class, module, config, name) -> None:
        weight = module.weight.detach()
        if config.init_lora_weights is False or weight.is_meta:  # B random: n > 0; no data
            return
        zero = (layer_class.row_sq_norms(weight) == 0).nonzero().flatten()
        if len(zero):
            raise ValueError(
                f"DoRA cannot adapt {name!r}: {layer_class.row_noun} {int(zero[0])} of its weight "
                "is all zeros"
                + (f" ({len(zero)} such)" if len(zero) > 1 else "")
                + ", so the magnitude starts at 0 and m/‖W + s·ΔW‖ is 0/0 there (peft's DoRA "
                f"gives NaN). Exclude the module (exclude_modules=[{name!r}]) or use LoRA"
            )

    def create(self, layer: LoRAWeightLayer, adapter_dtype: torch.dtype) -> None:
        layer.lora_magnitude = nn.Parameter(
            torch.empty(layer.magnitude_shape, device=layer.weight.device, dtype=adapter_dtype)
        )
        layer.register_buffer("weight_sq_norm", None, persistent=False)
        layer._merged_norm = None  # the norm merge() used, for unmerge()
        layer._weight_key = None  # (data pointer, version) of W when weight_sq_norm was computed
        layer.register_load_state_dict_post_hook(_weight_loaded)

    @torch.no_grad()
    def init(self, layer: LoRAWeightLayer) -> None:
        self.weight_changed(layer)
        norm = layer.dora_norm(layer.weight_sq_norm)
        layer.lora_magnitude.copy_(norm.reshape(layer.magnitude_shape))

    @torch.no_grad()
    def weight_changed(self, layer: LoRAWeightLayer) -> None:
        layer.weight_sq_norm = layer.row_sq_norms(layer.weight)
        layer._weight_key = (layer.weight.data_ptr(), layer.weight._version)

    def cached_weight_sq_norm(self, layer: LoRAWeightLayer) -> Tensor:
        if not torch.compiler.is_compiling():
            if layer._weight_key != (layer.weight.data_ptr(), layer.weight._version):
                self.weight_changed(layer)
        return layer.weight_sq_norm

    def forward(self, layer: LoRAWeightLayer, x: Tensor) -> Tensor:
        return layer.dora_output(x, self.cached_weight_sq_norm(layer))

    def merge(self, layer: LoRAWeightLayer, weight: Tensor) -> Tensor:
        """``(m/n) ⊙ (W + s·ΔW)``; n is kept for ``unmerge``."""
        layer._merged_norm = layer.dora_norm(self.cached_weight_sq_norm(layer))
        magnitude = layer.lora_magnitude.reshape(-1).to(weight.dtype)
        return (weight + layer.delta_weight()) * layer.per_row(magnitude / layer._merged_norm)

    def unmerge(self, layer: LoRAWeightLayer, merged: Tensor) -> Tensor:
        magnitude = layer.lora_magnitude.reshape(-1).to(merged.dtype)
        if (magnitude == 0).any():
            raise ValueError("cannot unmerge DoRA: a magnitude entry is 0, W is lost there")
        norm = layer._merged_norm.to(merged.dtype)
        layer._merged_norm = None
        return merged * layer.per_row(norm / magnitude) - layer.delta_weight()


WEIGHT_LORA = WeightLoRAVariant()
WEIGHT_DORA = WeightDoRAVariant()


def weight_variant_for(use_dora: bool) -> WeightLoRAVariant:
    return WEIGHT_DORA if use_dora else WEIGHT_LORA


def _weight_loaded(layer: LoRAWeightLayer, incompatible_keys) -> None:
    """``load_state_dict`` post-hook: W may have been loaded in place."""
    layer.variant.weight_changed(layer)


# -- checks shared by the layer classes ---------------------------------------------------------


def config_rank(config: LoRAConfig, name: str) -> tuple[int, float]:
    """``(r, α)`` of module ``name``; raises ``ValueError`` for a rank_pattern rank < 1."""
    rank, alpha = config.rank_and_alpha(name)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank_pattern gives {name!r} rank {rank!r}; ranks must be ints >= 1")
    return rank, alpha


def add_lora_bias(
    bias: Tensor | None, lora_bias: Tensor | None, scaling: float, dtype: torch.dtype
) -> Tensor | None:
    """The base bias plus ``s·b_B`` (B's bias, scaled as B is), in ``dtype``: the bias the ops
    get (``y = conv(x, W) + b + s·(B(A(x)) + b_B)``)."""
    bias = None if bias is None else bias.to(dtype)
    if lora_bias is None:
        return bias
    lora_bias = lora_bias.to(dtype) * scaling
    return lora_bias if bias is None else bias + lora_bias


def lora_bias_refusal(layer: nn.Module) -> str | None:
    """Why ``layer``'s ``lora_bias`` cannot merge (the base has no bias), or None."""
    if getattr(layer, "lora_bias", None) is not None and getattr(layer, "bias", None) is None:
        return (
            "lora_bias cannot be merged into a layer without a bias (peft refuses this merge "
            "too): keep the adapter unmerged, or use lora_bias=False"
        )
    return None


def init_lora_bias(lora_bias: Tensor, init_lora_weights: bool | str, rank: int) -> None:
    """peft's init of B's bias: zeros, except ``init_lora_weights=False`` (random, for tests:
    the default of a layer with fan-in r)."""
    if init_lora_weights is False:
        bound = 1 / math.sqrt(rank)
        nn.init.uniform_(lora_bias, -bound, bound)
    else:
        nn.init.zeros_(lora_bias)


# -- the layer ----------------------------------------------------------------------------------


class LoRAWeightLayer(AdapterLayer):
    """LoRA (DoRA with ``use_dora``) around a frozen module with one weight W; see the module
    docstring for what a subclass declares. ``merged``: the update lives in W (forward is the
    base layer's); ``disabled``: the adapter is skipped. ``merge()`` / ``unmerge()`` are
    idempotent; ``merge_refusal()`` says when a layer cannot merge."""

    mergeable = True
    factor_names: ClassVar[tuple[str, str]] = ("lora_A", "lora_B")
    row_noun: ClassVar[str] = "row"  # what DoRA's magnitude has one entry per (for messages)
    magnitude_shape: tuple[int, ...]

    def __init__(
        self,
        base: nn.Module,
        r: int,
        lora_alpha: float,
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        lora_bias: bool = False,
        init_lora_weights: bool | str = True,
        adapter_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if not self.adapts(base):
            raise TypeError(f"{type(self).__name__} cannot adapt a {type(base).__name__}")
        if r < 1:
            raise ValueError(f"rank r must be >= 1, got {r}")
        if lora_bias and use_dora:
            raise ValueError("lora_bias is not supported with DoRA (as in peft)")
        for name, param in base._parameters.items():  # the same objects, not copies
            self.register_parameter(name, param)
        for name, buffer in base._buffers.items():
            self.register_buffer(name, buffer, name not in base._non_persistent_buffers_set)
        self.weight.requires_grad_(False)
        object.__setattr__(self, "base_module", base)  # what unwrap() puts back; not a child
        self.r, self.lora_alpha, self.dropout_p = r, lora_alpha, float(dropout)
        self.use_rslora = use_rslora
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.variant = weight_variant_for(use_dora)
        factory = {"device": self.weight.device, "dtype": adapter_dtype}
        for name, shape in self.factor_shapes(base, r).items():
            setattr(self, name, nn.Parameter(torch.empty(shape, **factory)))
        self.magnitude_shape = self.magnitude_shape_of(base)
        out = math.prod(self.magnitude_shape)
        self.lora_bias = nn.Parameter(torch.empty(out, **factory)) if lora_bias else None
        self.merged = False
        self.disabled = False
        self.variant.create(self, adapter_dtype)
        self.reset_adapter_parameters(init_lora_weights)
        self.train(base.training)

    # -- what a subclass declares (class level) -------------------------------------------------

    @classmethod
    def factor_shapes(cls, module: nn.Module, rank: int) -> dict[str, tuple[int, ...]]:
        """``{factor name: shape}`` of A and B, in ``factor_names`` order."""
        raise NotImplementedError

    @classmethod
    def magnitude_shape_of(cls, module: nn.Module) -> tuple[int, ...]:
        """The shape peft gives DoRA's magnitude for ``module``."""
        raise NotImplementedError

    @classmethod
    def row_sq_norms(cls, weight: Tensor) -> Tensor:
        """``‖W‖²`` along DoRA's axis, one per magnitude entry, in at least float32."""
        raise NotImplementedError

    @classmethod
    def check_module(cls, module: nn.Module, config: LoRAConfig, name: str, rank: int) -> None:
        """The layer type's own refusals (raise ``ValueError`` naming ``name``)."""

    def init_factors(self, init_lora_weights: bool | str) -> None:
        raise NotImplementedError

    # -- the protocol, class level --------------------------------------------------------------

    @classmethod
    def check(cls, module: nn.Module, config: LoRAConfig, name: str) -> None:
        rank, _ = config_rank(config, name)
        cls.check_module(module, config, name, rank)
        weight_variant_for(config.use_dora).check(cls, module, config, name)

    @classmethod
    def adapter_shapes(cls, module: nn.Module, config: LoRAConfig, name: str) -> dict:
        rank, _ = config.rank_and_alpha(name)
        magnitude_shape = cls.magnitude_shape_of(module)
        shapes = dict(cls.factor_shapes(module, rank))
        if config.lora_bias:
            shapes["lora_bias"] = (math.prod(magnitude_shape),)
        return shapes | weight_variant_for(config.use_dora).extra_shapes(magnitude_shape)

    @classmethod
    def build(cls, module: nn.Module, config: LoRAConfig, name: str) -> LoRAWeightLayer:
        rank, alpha = config.rank_and_alpha(name)
        return cls(
            module,
            rank,
            alpha,
            dropout=config.lora_dropout,
            use_rslora=config.use_rslora,
            use_dora=config.use_dora,
            lora_bias=config.lora_bias,
            init_lora_weights=config.init_lora_weights,
            adapter_dtype=getattr(torch, config.adapter_dtype),
        )

    # -- the protocol, instance -----------------------------------------------------------------

    @property
    def use_dora(self) -> bool:
        return isinstance(self.variant, WeightDoRAVariant)

    def adapter_parameter_names(self) -> list[str]:
        bias = ["lora_bias"] if self.lora_bias is not None else []
        return [*self.factor_names, *bias, *self.variant.parameter_names]

    def adapter_buffer_names(self) -> list[str]:
        return list(self.variant.buffer_names)

    @property
    def base_layer(self) -> nn.Module:
        return self.base_module

    def unwrap(self) -> nn.Module:
        base = self.base_module
        for name in [*base._parameters, *base._buffers]:
            setattr(base, name, getattr(self, name))
        return base

    def factors(self) -> tuple[Tensor, Tensor]:
        """(A, B) as the layer holds them."""
        first, second = self.factor_names
        return self.get_parameter(first), self.get_parameter(second)

    @torch.no_grad()
    def reset_adapter_parameters(self, init_lora_weights: bool | str = True) -> None:
        """Initialise the factors (and B's bias, and the variant's tensors) as peft does."""
        self.init_factors(init_lora_weights)
        if self.lora_bias is not None:
            init_lora_bias(self.lora_bias, init_lora_weights, self.r)
        self.variant.init(self)

    # -- forward --------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        if self.disabled or self.merged:
            return self.base_output(x)
        return self.variant.forward(self, x)

    # -- merge ----------------------------------------------------------------------------------

    def merge_refusal(self) -> str | None:
        return lora_bias_refusal(self)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into W (``W ← W + s·ΔW``; DoRA ``W ← (m/n) ⊙ (W + s·ΔW)``) and
        ``lora_bias`` into the bias (``b ← b + s·b_B``)."""
        if self.merged:
            return
        reason = self.merge_refusal()
        if reason is not None:
            raise ValueError(reason)
        wide = self.weight.to(torch.promote_types(self.weight.dtype, torch.float32))
        self.weight.copy_(self.variant.merge(self, wide))
        self.variant.weight_changed(self)
        if self.lora_bias is not None:
            self.bias.add_((self.lora_bias * self.scaling).to(self.bias.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge()`` (exact up to the rounding of W's dtype)."""
        if not self.merged:
            return
        wide = self.weight.to(torch.promote_types(self.weight.dtype, torch.float32))
        self.weight.copy_(self.variant.unmerge(self, wide))
        self.variant.weight_changed(self)
        if self.lora_bias is not None:
            self.bias.sub_((self.lora_bias * self.scaling).to(self.bias.dtype))
        self.merged = False

    # -- helpers for subclasses -----------------------------------------------------------------

    def effective_bias(self, dtype: torch.dtype) -> Tensor | None:
        """The base bias plus ``s·lora_bias``, in ``dtype`` (``add_lora_bias``)."""
        return add_lora_bias(getattr(self, "bias", None), self.lora_bias, self.scaling, dtype)

    def compute_dtype(self, x: Tensor) -> torch.dtype:
        """x's dtype, or the autocast dtype when autocast is on for x's device."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype

    def extra_repr(self) -> str:
        return (
            f"{self.variant.name}: r={self.r}, alpha={self.lora_alpha}, "
            f"scaling={self.scaling:.4g}, dropout={self.dropout_p}, "
            f"lora_bias={self.lora_bias is not None}"
        )
