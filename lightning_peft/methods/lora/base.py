"""What every LoRA layer type shares: one layer base, ``LoRALayer``, and LoRA and DoRA as two
variant objects (peft's ``LoraVariant``) that never look at the layer type.

LoRA: ``y = base(x) + s·ΔW(dropout(x))`` with ``ΔW = B A`` (reshaped as the layer type lays it
out), ``s = α/r`` (rsLoRA ``α/√r``); ``lora_bias`` adds B's bias, ``+ s·b_B``. DoRA (Liu et al.
2024, https://arxiv.org/abs/2402.09353): ``y = (m/n) ⊙ (base(x) − b + s·ΔW x) + b`` with
``n = ‖W + s·ΔW‖`` per magnitude entry, held constant in backward.

The base holds the protocol (``AdapterLayer``) once: rank, α and scaling, A and B in the
adapter dtype, ``lora_bias``, the ``check`` / ``adapter_shapes`` / ``build`` skeleton, ``merge`` /
``unmerge`` (with DoRA's merged-norm bookkeeping), ``disabled``, ``extra_repr`` and the state-dict
load hook. A layer type (``LoRALinear``, ``LoRAConv``, ``LoRAEmbedding``, ``QuantizedLoRALinear``,
``LoRAMultiheadAttention``) subclasses it and declares:

- class attributes: ``factor_names`` and ``saved_names`` (peft's keys), ``row_noun`` and
  ``dora_axis`` (what DoRA's magnitude scales), ``supports_dora`` / ``supports_lora_bias``,
  ``reuses_inference_norm`` (whether its DoRA forward takes a precomputed norm);
- class methods, used before any layer exists: ``adapts``, ``base_refusal`` (the constructor's
  ``TypeError``), ``check_module`` (its own refusals), ``factor_shapes`` (default A (r, in),
  B (out, r) from ``out_in_of``), ``magnitude_shape_of`` (DoRA's magnitude as peft stores it;
  ``lora_bias`` has its size), ``weight_sq_norm_of`` (``‖W‖²`` per magnitude entry: the zero-row
  refusal);
- instance hooks: ``share_base`` (register the base's parameters and buffers under their own
  names, so the frozen state-dict keys do not change; ``unwrap()`` hands them back),
  ``init_factors``, ``lora_output(x)`` and ``dora_output(x, weight_sq_norm, weight_norm)`` (the
  adapted forward, through ``peft_kernels``), ``base_output(x)`` (disabled or merged),
  ``dora_norm(weight_sq_norm)`` (n, detached), ``compute_weight_sq_norm()``, ``delta_weight()``
  (``s·ΔW`` laid out as ``merge_view()``, the view of W that ``merge`` rewrites, in at least
  float32) and ``describe()``.

Where layer types differ in kind, the difference stays in the type's module: the quantized layer
merges into a float copy and never writes W; multi-head attention has two factor pairs on two
weights and its own forward, init and merge.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_peft.core.adapter import AdapterLayer
from lightning_peft.core.config import is_positive_int
from lightning_peft.methods.lora.config import REWRITES_BASE, LoRAConfig, lora_scaling

# peft's keys for a layer whose factors are ``lora_A`` / ``lora_B`` (linear, convolution).
LORA_SAVED_NAMES = {
    "lora_A": "lora_A.weight",
    "lora_B": "lora_B.weight",
    "lora_bias": "lora_B.bias",
    "lora_magnitude": "lora_magnitude_vector",
    "weight": "base_layer.weight",
    "bias": "base_layer.bias",
}

# -- variants -----------------------------------------------------------------------------------


class LoRAVariant:
    """Plain LoRA, and the interface of variants.

    A variant is stateless: whatever it adds (parameters, buffers) lives on the layer, under the
    names it declares in ``parameter_names`` / ``buffer_names``.
    """

    name = "LoRA"
    parameter_names: tuple[str, ...] = ()
    buffer_names: tuple[str, ...] = ()

    def extra_shapes(self, layer_class: type[LoRALayer], module: nn.Module) -> dict[str, tuple]:
        """``{name: shape}`` of the parameters the variant adds to a layer on ``module``."""
        return {}

    def check(self, layer_class: type[LoRALayer], module: nn.Module, config, name: str) -> None:
        """Raise ``ValueError`` naming ``name`` if the variant cannot adapt ``module``."""

    def create(self, layer: LoRALayer, factory: dict[str, Any]) -> None:
        """Register the variant's tensors on ``layer`` (uninitialised; ``factory``: device and
        adapter dtype)."""

    def init(self, layer: LoRALayer) -> None:
        """Initialise the variant's tensors, once the factors (and W, for PiSSA/OLoRA) are set."""

    def weight_changed(self, layer: LoRALayer) -> None:
        """W changed in place (merge, unmerge, a state-dict load): refresh what depends on it."""

    def forward(self, layer: LoRALayer, x: Tensor) -> Tensor:
        return layer.lora_output(x)

    def merge(self, layer: LoRALayer, weight: Tensor) -> Tensor:
        """The merged weight, from W (``layer.merge_view()``'s layout) in at least float32."""
        return weight + layer.delta_weight()

    def unmerge(self, layer: LoRALayer, merged: Tensor) -> Tensor:
        """W back from the merged weight in at least float32."""
        return merged - layer.delta_weight()


def refuse_zero_rows(weight_sq_norm: Tensor, name: str, noun: str = "row") -> None:
    """DoRA's refusal of a weight with an all-zero slice (``‖W_i‖² = 0``, one entry per
    magnitude entry), naming ``name``: the magnitude would start at 0 and ``m/n`` be 0/0."""
    zero_rows = (weight_sq_norm == 0).nonzero().flatten()
    if len(zero_rows):
        raise ValueError(
            f"DoRA cannot adapt {name!r}: {noun} {int(zero_rows[0])} of its weight is all zeros"
            + (f" ({len(zero_rows)} such)" if len(zero_rows) > 1 else "")
            + ", so the magnitude starts at ‖W_i‖ = 0 and m/‖W_i + s·ΔW_i‖ is 0/0 (peft's "
            "DoRA gives NaN there). Exclude the module "
            f"(exclude_modules=[{name!r}]) or use LoRA"
        )


class DoRAVariant(LoRAVariant):
    """DoRA: ``y = (m/n) ⊙ (base(x) − b + s·ΔW x) + b``, n held constant in backward.

    ``‖W_i‖²`` (one per magnitude entry) is kept in the non-persistent buffer ``weight_sq_norm``,
    computed when the layer is built and refreshed whenever W changes through this package
    (merge, unmerge, ``load_state_dict``, dtype conversion). In eager mode a W changed in place
    by other code is also noticed (by its version counter); under ``torch.compile`` the buffer is
    read as is (no data-pointer test, no graph break): call ``layer.variant.weight_changed(layer)``
    after changing W in place yourself.

    A weight slice of zeros is refused at injection: DoRA's magnitude starts at ``‖W_i‖ = 0`` and
    ``m/n`` is 0/0 there (peft's DoRA gives NaN); no epsilon is added.

    The norm n itself is recomputed by every forward that autograd records (A and B change every
    step); forwards without autograd (decoding, evaluation) of a layer type whose forward takes
    a precomputed n (``reuses_inference_norm``) reuse it until W, A or B change (their data
    pointers and version counters), and a recorded forward drops it, since a sharded strategy
    may refill A and B in place between steps without a version bump.
    """

    name = "DoRA"
    parameter_names = ("lora_magnitude",)
    buffer_names = ("weight_sq_norm",)

    def extra_shapes(self, layer_class: type[LoRALayer], module: nn.Module) -> dict[str, tuple]:
        return {"lora_magnitude": layer_class.magnitude_shape_of(module)}

    def check(self, layer_class: type[LoRALayer], module: nn.Module, config, name: str) -> None:
        if config.init_lora_weights is False or module.weight.is_meta:  # B random: n > 0
            return
        refuse_zero_rows(layer_class.weight_sq_norm_of(module), name, layer_class.row_noun)

    def create(self, layer: LoRALayer, factory: dict[str, Any]) -> None:
        shape = layer.magnitude_shape_of(layer.base_module)
        layer.lora_magnitude = nn.Parameter(torch.empty(shape, **factory))
        layer.register_buffer("weight_sq_norm", None, persistent=False)
        layer._merged_norm = None  # the norm merge() used, for unmerge()
        layer._inference_norm = None  # (key of W, A, B, n) for forwards without autograd
        layer._weight_key = None  # (data pointer, version) of W when weight_sq_norm was computed

    @torch.no_grad()
    def init(self, layer: LoRALayer) -> None:
        self.weight_changed(layer)
        magnitude = layer.lora_magnitude
        magnitude.copy_(self.weight_norm(layer).reshape(magnitude.shape))

    @torch.no_grad()
    def weight_changed(self, layer: LoRALayer) -> None:
        layer.weight_sq_norm = layer.compute_weight_sq_norm()
        layer._weight_key = (layer.weight.data_ptr(), layer.weight._version)

    def cached_weight_sq_norm(self, layer: LoRALayer) -> Tensor:
        """``‖W_i‖²`` in at least float32."""
        if not torch.compiler.is_compiling():
            if layer._weight_key != (layer.weight.data_ptr(), layer.weight._version):
                self.weight_changed(layer)
        return layer.weight_sq_norm

    def weight_norm(self, layer: LoRALayer) -> Tensor:
        """n = ‖W + s·ΔW‖ per magnitude entry, flat, in at least float32."""
        return layer.dora_norm(self.cached_weight_sq_norm(layer))

    def inference_weight_norm(self, layer: LoRALayer) -> Tensor | None:
        """n for a forward that autograd does not record, reused until W, A or B change; None
        (the op computes n) for a recorded forward, under ``torch.compile``, or for a layer type
        that does not take a precomputed n."""
        if torch.compiler.is_compiling() or not layer.reuses_inference_norm:
            return None
        if torch.is_grad_enabled():
            layer._inference_norm = None
            return None
        weight, (lora_A, lora_B) = layer.weight, layer.factors()
        key = (
            (weight.data_ptr(), weight._version),
            (lora_A.data_ptr(), lora_A._version),
            (lora_B.data_ptr(), lora_B._version),
        )
        if layer._inference_norm is None or layer._inference_norm[0] != key:
            layer._inference_norm = (key, self.weight_norm(layer))
        return layer._inference_norm[1]

    def forward(self, layer: LoRALayer, x: Tensor) -> Tensor:
        return layer.dora_output(
            x, self.cached_weight_sq_norm(layer), self.inference_weight_norm(layer)
        )

    def merge(self, layer: LoRALayer, weight: Tensor) -> Tensor:
        """``(m/n) ⊙ (W + s·ΔW)``; n is kept for ``unmerge``."""
        layer._merged_norm = self.weight_norm(layer)
        magnitude = layer.lora_magnitude.reshape(-1).to(weight.dtype)
        scale = magnitude / layer._merged_norm.to(weight.dtype)
        return (weight + layer.delta_weight()) * layer.per_entry(scale, weight)

    def unmerge(self, layer: LoRALayer, merged: Tensor) -> Tensor:
        magnitude = layer.lora_magnitude.reshape(-1).to(merged.dtype)
        if (magnitude == 0).any():
            raise ValueError("cannot unmerge DoRA: a magnitude entry is 0, W is lost there")
        scale = layer._merged_norm.to(merged.dtype) / magnitude
        layer._merged_norm = None
        return merged * layer.per_entry(scale, merged) - layer.delta_weight()


LORA_VARIANT = LoRAVariant()
DORA_VARIANT = DoRAVariant()


def variant_for(use_dora: bool) -> LoRAVariant:
    """The variant a config asks for: the one place that reads ``use_dora``."""
    return DORA_VARIANT if use_dora else LORA_VARIANT


def _weight_loaded(layer: LoRALayer, incompatible_keys) -> None:
    """``load_state_dict`` post-hook: W may have been loaded in place."""
    layer.variant.weight_changed(layer)


# -- shared helpers -----------------------------------------------------------------------------


def checked_rank(config: LoRAConfig, name: str) -> int:
    """The rank ``config`` gives module ``name`` (``rank_pattern`` included), or ``ValueError``."""
    rank, _ = config.rank_and_alpha(name)
    if not is_positive_int(rank):
        raise ValueError(f"rank_pattern gives {name!r} rank {rank!r}; ranks must be ints >= 1")
    return rank


def init_factor_pair(lora_A: Tensor, lora_B: Tensor, init: bool | str, rank: int) -> None:
    """peft's init of a factor pair: A kaiming-uniform (a=√5, as ``nn.Linear``; ``"gaussian"``:
    N(0, 1/r)), B = 0 (Microsoft's reference, peft's True); ``False``: B kaiming-uniform too,
    so the adapter acts from the start (tests)."""
    if init == "gaussian":
        nn.init.normal_(lora_A, std=1 / rank)
    else:
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
    if init is False:
        nn.init.kaiming_uniform_(lora_B, a=math.sqrt(5))
    else:
        nn.init.zeros_(lora_B)


def init_lora_bias(lora_bias: Tensor, init_lora_weights: bool | str, rank: int) -> None:
    """peft's init of B's bias: zeros, except ``init_lora_weights=False`` (random, for tests:
    the default of a layer with fan-in r)."""
    if init_lora_weights is False:
        bound = 1 / math.sqrt(rank)
        nn.init.uniform_(lora_bias, -bound, bound)
    else:
        nn.init.zeros_(lora_bias)


def add_lora_bias(
    bias: Tensor | None, lora_bias: Tensor | None, scaling: float, dtype: torch.dtype
) -> Tensor | None:
    """The base bias plus ``s·b_B`` (B's bias, scaled as B is), in ``dtype``: the bias the ops
    get (``y = x Wᵀ + b + s·(B A x + b_B)``)."""
    bias = None if bias is None else bias.to(dtype)
    if lora_bias is None:
        return bias
    lora_bias = lora_bias.to(dtype) * scaling
    return lora_bias if bias is None else bias + lora_bias


def compute_dtype(x: Tensor) -> torch.dtype:
    """x's dtype, or the autocast dtype when autocast is on for x's device."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# -- the layer base -----------------------------------------------------------------------------


class LoRALayer(AdapterLayer):
    """LoRA (DoRA with ``use_dora``) around a frozen module; see the module docstring for what a
    layer type declares.

    Args:
        base: the module to adapt (its parameters are shared, not copied).
        r: rank; lora_alpha: α; dropout: dropout on the adapter input.
        use_rslora, use_dora, lora_bias, init_lora_weights: as in ``LoRAConfig``.
        adapter_dtype: dtype of the adapter parameters (float32 by default, whatever W's).
        backend: the ``peft_kernels`` backend (linear layers).

    Flags: ``merged`` (the update lives in W; forward is the base layer's), ``disabled`` (the
    adapter is skipped). ``merge()`` / ``unmerge()`` are idempotent; ``merge_refusal()`` says
    when a layer cannot merge.
    """

    mergeable = True
    saved_names: ClassVar[dict[str, str]] = LORA_SAVED_NAMES
    fast_names = ("lora_B",)
    factor_names: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B")
    row_noun: ClassVar[str] = "row"  # what DoRA's magnitude has one entry per (for messages)
    dora_axis: ClassVar[int] = 0  # the axis of W (``merge_view()``) that the magnitude scales
    supports_dora: ClassVar[bool] = True
    supports_lora_bias: ClassVar[bool] = True
    # Whether ``dora_output`` takes a precomputed n (the inference norm cache, ``DoRAVariant``).
    reuses_inference_norm: ClassVar[bool] = True

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
        backend: str = "auto",
    ) -> None:
        super().__init__()
        refusal = self.base_refusal(base)
        if refusal is not None:
            raise TypeError(refusal)
        if r < 1:
            raise ValueError(f"rank r must be >= 1, got {r}")
        if lora_bias and use_dora:
            raise ValueError("lora_bias is not supported with DoRA (as in peft)")
        for option, value, supported in (
            ("use_dora", use_dora, self.supports_dora),
            ("lora_bias", lora_bias, self.supports_lora_bias),
        ):
            if value and not supported:
                raise ValueError(f"{type(self).__name__} does not support {option}=True")
        self.share_base(base)
        object.__setattr__(self, "base_module", base)  # what unwrap() puts back; not a child
        self.r, self.lora_alpha, self.dropout_p = r, lora_alpha, float(dropout)
        self.use_rslora, self.backend = use_rslora, backend
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        self.variant = variant_for(use_dora)
        factory = {"device": next(base.parameters()).device, "dtype": adapter_dtype}
        for name, shape in self.factor_shapes(base, r).items():
            setattr(self, name, nn.Parameter(torch.empty(shape, **factory)))
        self.lora_bias = None
        if lora_bias:
            size = math.prod(self.magnitude_shape_of(base))
            self.lora_bias = nn.Parameter(torch.empty(size, **factory))
        self.merged = False
        self.disabled = False
        self.variant.create(self, factory)
        self.register_load_state_dict_post_hook(_weight_loaded)
        self.reset_adapter_parameters(init_lora_weights)
        self.train(base.training)

    # -- what a layer type declares (class level) -----------------------------------------------

    @classmethod
    def base_refusal(cls, base: nn.Module) -> str | None:
        """Why this class cannot adapt ``base`` (the constructor's ``TypeError``), or None."""
        if cls.adapts(base):
            return None
        return f"{cls.__name__} cannot adapt a {type(base).__name__}"

    @classmethod
    def check_module(cls, module: nn.Module, config: LoRAConfig, name: str, rank: int) -> None:
        """The layer type's own refusals (raise ``ValueError`` naming ``name``)."""

    @classmethod
    def out_in_of(cls, module: nn.Module) -> tuple[int, int]:
        """``(out, in)`` of a module whose update is a matrix (the default shapes)."""
        raise NotImplementedError

    @classmethod
    def factor_shapes(cls, module: nn.Module, rank: int) -> dict[str, tuple[int, ...]]:
        """``{factor name: shape}``, in ``factor_names`` order: A (r, in), B (out, r)."""
        out_features, in_features = cls.out_in_of(module)
        return {"lora_A": (rank, in_features), "lora_B": (out_features, rank)}

    @classmethod
    def magnitude_shape_of(cls, module: nn.Module) -> tuple[int, ...]:
        """The shape peft gives DoRA's magnitude for ``module`` (default (out,))."""
        return (cls.out_in_of(module)[0],)

    @classmethod
    def weight_sq_norm_of(cls, module: nn.Module) -> Tensor:
        """``‖W‖²`` of ``module``'s weight along DoRA's axis, one per magnitude entry, in at
        least float32."""
        raise NotImplementedError

    # -- the protocol, class level --------------------------------------------------------------

    @classmethod
    def check(cls, module: nn.Module, config: LoRAConfig, name: str) -> None:
        rank = checked_rank(config, name)
        cls.check_module(module, config, name, rank)
        variant_for(config.use_dora).check(cls, module, config, name)

    @classmethod
    def adapter_shapes(cls, module: nn.Module, config: LoRAConfig, name: str) -> dict:
        rank, _ = config.rank_and_alpha(name)
        shapes = dict(cls.factor_shapes(module, rank))
        if config.lora_bias:
            shapes["lora_bias"] = (math.prod(cls.magnitude_shape_of(module)),)
        return shapes | variant_for(config.use_dora).extra_shapes(cls, module)

    @classmethod
    def build(cls, module: nn.Module, config: LoRAConfig, name: str) -> LoRALayer:
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
            backend=config.backend,
        )

    # -- the protocol, instance -----------------------------------------------------------------

    def share_base(self, base: nn.Module) -> None:
        """Register the base's parameters and buffers under their own names (the same objects,
        not copies); W is frozen."""
        for name, param in base._parameters.items():
            self.register_parameter(name, param)
        for name, buffer in base._buffers.items():
            self.register_buffer(name, buffer, name not in base._non_persistent_buffers_set)
        self.weight.requires_grad_(False)

    @property
    def use_dora(self) -> bool:
        return self.variant is DORA_VARIANT

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
        first, second = self.factor_names[:2]
        return getattr(self, first), getattr(self, second)

    def extra_repr(self) -> str:
        kind, shape, rank = self.describe()
        return (
            f"{kind}: {shape}, r={rank}, alpha={self.lora_alpha}, scaling={self.scaling:.4g}, "
            f"dropout={self.dropout_p}, lora_bias={self.lora_bias is not None}"
        )

    # -- init -----------------------------------------------------------------------------------

    def init_factors(self, init_lora_weights: bool | str) -> None:
        """Set A and B as peft does (``init_factor_pair``); the inits that rewrite W are the
        linear layer's own."""
        if init_lora_weights in REWRITES_BASE:
            raise ValueError(
                f"init_lora_weights={init_lora_weights!r} is not for {type(self).__name__}"
            )
        init_factor_pair(*self.factors(), init_lora_weights, self.r)

    @torch.no_grad()
    def reset_adapter_parameters(self, init_lora_weights: bool | str = True) -> None:
        """Initialise the factors (and B's bias, and the variant's tensors) as peft does."""
        self.init_factors(init_lora_weights)
        if self.lora_bias is not None:
            init_lora_bias(self.lora_bias, init_lora_weights, self.r)
        self.variant.init(self)

    # -- forward --------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        if self.router is not None:  # several adapters active here, or a mixed batch
            return self.router(self, x)
        if self.disabled or self.merged:
            return self.base_output(x)
        return self.variant.forward(self, x)

    # -- named adapters -------------------------------------------------------------------------

    supports_named = True

    @classmethod
    def named_refusal(cls, config: LoRAConfig, name: str) -> str | None:
        init = config.init_lora_weights
        if init in REWRITES_BASE:
            return (
                f"init_lora_weights={init!r} rewrites the base weight, which the adapters "
                f"already there share; adapter {name!r} cannot use it beside them: use True or "
                "'gaussian'"
            )
        return None

    def adapter_delta(self, x: Tensor) -> Tensor:
        """What this adapter adds to the base output: ``variant.forward(x) − base(x)`` (DoRA's
        relative to the base W: ``(m/n − 1) ⊙ (x Wᵀ) + (m/n) ⊙ s·B A x``); a layer type with a
        cheaper branch overrides it."""
        return self.variant.forward(self, x) - self.base_output(x)

    def compose(self, x: Tensor, layers: list[LoRALayer]) -> Tensor:
        """``base(x) + Σ_k delta_k(x)`` over the active ``layers`` at this site (peft's sum;
        each DoRA delta relative to the base W). A site with a merged adapter runs as its
        (merged) base, as peft's does; disabled layers are skipped."""
        out = self.base_output(x)
        if self.merged or any(layer.merged for layer in layers):
            return out
        for layer in layers:
            if not layer.disabled:
                out = out + layer.adapter_delta(x)
        return out

    # -- weights and merge ----------------------------------------------------------------------

    def merge_view(self) -> Tensor:
        """The view of W that ``delta_weight()`` matches and ``merge()`` rewrites in place."""
        return self.weight

    def compute_weight_sq_norm(self) -> Tensor:
        """``weight_sq_norm_of`` for this layer's W (the layer holds W as its base does)."""
        return self.weight_sq_norm_of(self)

    def per_entry(self, values: Tensor, weight: Tensor) -> Tensor:
        """``values``, one per magnitude entry, shaped to broadcast against ``weight``."""
        shape = [1] * weight.dim()
        shape[self.dora_axis] = -1
        return values.view(shape)

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """``s·B A`` (out, in) in float32 (float64 for float64 adapters)."""
        lora_A, lora_B = self.factors()
        dtype = torch.promote_types(lora_A.dtype, torch.float32)
        return self.scaling * (lora_B.to(dtype) @ lora_A.to(dtype))

    def merge_refusal(self) -> str | None:
        if self.lora_bias is not None and getattr(self, "bias", None) is None:
            return (
                "lora_bias cannot be merged into a layer without a bias (peft refuses this merge "
                "too): keep the adapter unmerged, or use lora_bias=False"
            )
        return None

    @torch.no_grad()
    def _rewrite_weight(self, rewrite) -> None:
        """W ← ``rewrite(self, W)``, computed in at least float32; then what depends on W."""
        weight = self.merge_view()
        wide = weight.to(torch.promote_types(weight.dtype, torch.float32))
        weight.copy_(rewrite(self, wide))
        self.variant.weight_changed(self)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into W (``W ← W + s·ΔW``; DoRA ``W ← (m/n) ⊙ (W + s·ΔW)``) and
        ``lora_bias`` into the bias (``b ← b + s·b_B``)."""
        if self.merged:
            return
        reason = self.merge_refusal()
        if reason is not None:
            raise ValueError(reason)
        self._rewrite_weight(self.variant.merge)
        if self.lora_bias is not None:
            self.bias.add_((self.lora_bias * self.scaling).to(self.bias.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge()`` (exact up to the rounding of W's dtype)."""
        if not self.merged:
            return
        self._rewrite_weight(self.variant.unmerge)
        if self.lora_bias is not None:
            self.bias.sub_((self.lora_bias * self.scaling).to(self.bias.dtype))
        self.merged = False
