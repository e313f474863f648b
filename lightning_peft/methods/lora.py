"""LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685), rsLoRA, and DoRA as a variant
(Liu et al. 2024, https://arxiv.org/abs/2402.09353), with PiSSA and OLoRA inits.

``LoRALinear`` adapts a frozen ``nn.Linear`` or transformers ``Conv1D``; it is a thin module over
``kernels.lora_linear`` / ``kernels.dora_linear``. It registers the base layer's own ``weight``
and ``bias`` under the same names, so the frozen state-dict keys do not change; the adapter adds
``lora_A`` (r, in), ``lora_B`` (out, r), ``lora_bias`` (out,) with ``lora_bias=True`` (B's bias,
``y += s·b_B``) and whatever its variant adds (DoRA: ``lora_magnitude`` (out,)). Convolutions and
embeddings have their own layer classes (``lora_conv``, ``lora_embedding``), and so has
``nn.MultiheadAttention`` (``lora_mha``), also in ``LORA.layers``. What differs between LoRA and
DoRA lives in a variant object (peft's
``LoraVariant``): its extra tensors, init, forward, merge and unmerge; the layer never branches on
the variant.
GPT-2's ``Conv1D`` stores its weight as (in, out) (``fan_in_fan_out``); the ops get a
transposed view, never a copy.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels import dora_linear, dora_weight_norm, lora_linear, weight_row_sq_norm
from lightning_peft.config import INIT_CHOICES, PEFT_INITS_NOT_HERE, REWRITES_BASE, LoRAConfig
from lightning_peft.methods.base import (
    AdapterLayer,
    Method,
    is_conv1d,
    is_linear_like,
    quantized_reason,
)
from lightning_peft.methods.lora_common import add_lora_bias, init_lora_bias, lora_bias_refusal
from lightning_peft.methods.lora_conv import LoRAConv
from lightning_peft.methods.lora_embedding import LoRAEmbedding
from lightning_peft.methods.lora_mha import LoRAMultiheadAttention

# -- variants -----------------------------------------------------------------------------------


class LoRAVariant:
    """Plain LoRA, ``y = x Wᵀ + b + s·(dropout(x) Aᵀ) Bᵀ``, and the interface of variants.

    A variant is stateless: whatever it adds (parameters, buffers) lives on the layer, under the
    names it declares in ``parameter_names`` / ``buffer_names``.
    """

    name = "LoRA"
    parameter_names: tuple[str, ...] = ()
    buffer_names: tuple[str, ...] = ()

    def extra_shapes(self, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        """``{name: shape}`` of the parameters the variant adds."""
        return {}

    def check(self, weight: Tensor, config: LoRAConfig, name: str) -> None:
        """Raise ``ValueError`` naming ``name`` if the variant cannot adapt W (out, in)."""

    def create(self, layer: LoRALinear, adapter_dtype: torch.dtype) -> None:
        """Register the variant's tensors on ``layer`` (uninitialised)."""

    def init(self, layer: LoRALinear) -> None:
        """Initialise the variant's tensors, once A, B (and W, for PiSSA/OLoRA) are set."""

    def weight_changed(self, layer: LoRALinear) -> None:
        """W changed in place (merge, unmerge, a state-dict load): refresh what depends on it."""

    def forward(self, layer: LoRALinear, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``x`` (..., in), W (out, in) detached, ``bias`` (out,) or None, all in the base's
        dtype; the adapter tensors stay in theirs (``kernels`` runs the branch in the wider)."""
        return lora_linear(
            x,
            weight,
            bias,
            layer.lora_A,
            layer.lora_B,
            layer.scaling,
            layer.dropout_p,
            training=layer.training,
            backend=layer.backend,
        )

    def merge(self, layer: LoRALinear, weight: Tensor) -> Tensor:
        """The merged weight (out, in), from W in at least float32."""
        return weight + layer.delta_weight()

    def unmerge(self, layer: LoRALinear, merged: Tensor) -> Tensor:
        """W (out, in) back from the merged weight in at least float32."""
        return merged - layer.delta_weight()


def refuse_zero_rows(weight_sq_norm: Tensor, name: str) -> None:
    """DoRA's refusal of a weight with an all-zero row (``‖W_i‖² = 0``, given (out,)), naming
    ``name``: the magnitude would start at 0 and ``m/n`` be 0/0 there."""
    zero_rows = (weight_sq_norm == 0).nonzero().flatten()
    if len(zero_rows):
        raise ValueError(
            f"DoRA cannot adapt {name!r}: row {int(zero_rows[0])} of its weight is all zeros"
            + (f" ({len(zero_rows)} such rows)" if len(zero_rows) > 1 else "")
            + ", so the magnitude starts at ‖W_i‖ = 0 and m/‖W_i + s·B_iA‖ is 0/0 (peft's "
            "DoRA gives NaN there). Exclude the module "
            f"(exclude_modules=[{name!r}]) or use LoRA"
        )


class DoRAVariant(LoRAVariant):
    """DoRA: ``y = (m/n) ⊙ (x (W + sBA)ᵀ) + b``, ``n = ‖W + sBA‖_row`` held constant in backward.

    ``‖W_i‖²`` (out,) is kept in the non-persistent buffer ``weight_sq_norm``, computed when the
    layer is built and refreshed whenever W changes through this package (merge, unmerge,
    ``load_state_dict``, dtype conversion). In eager mode a W changed in place by other code is
    also noticed (by its version counter); under ``torch.compile`` the buffer is read as is (no
    data-pointer test, no graph break): call ``layer.variant.weight_changed(layer)`` after
    changing W in place yourself.

    A weight row of zeros is refused at injection: DoRA's magnitude starts at ``‖W_i‖ = 0`` and
    ``m/n`` is 0/0 there (peft's DoRA gives NaN); no epsilon is added.

    The norm n itself is recomputed by every forward that autograd records (A and B change every
    step); forwards without autograd (decoding, evaluation) reuse it until W, A or B change
    (their data pointers and version counters), and a recorded forward drops it, since a sharded
    strategy may refill A and B in place between steps without a version bump.
    """

    name = "DoRA"
    parameter_names = ("lora_magnitude",)
    buffer_names = ("weight_sq_norm",)

    def extra_shapes(self, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        return {"lora_magnitude": (out_features,)}

    def check(self, weight: Tensor, config: LoRAConfig, name: str) -> None:
        if config.init_lora_weights is False or weight.is_meta:  # B random: n_i > 0; no data
            return
        refuse_zero_rows(weight_row_sq_norm(weight), name)

    def create(self, layer: LoRALinear, adapter_dtype: torch.dtype) -> None:
        weight = layer.weight
        layer.lora_magnitude = nn.Parameter(
            torch.empty(layer.out_features, device=weight.device, dtype=adapter_dtype)
        )
        layer.register_buffer("weight_sq_norm", None, persistent=False)
        layer._merged_norm = None  # the norm merge() used, for unmerge()
        layer._inference_norm = None  # (key of W, A, B, n) for forwards without autograd
        layer._weight_key = None  # (data pointer, version) of W when weight_sq_norm was computed
        layer.register_load_state_dict_post_hook(_weight_loaded)

    @torch.no_grad()
    def init(self, layer: LoRALinear) -> None:
        self.weight_changed(layer)
        layer.lora_magnitude.copy_(self.weight_norm(layer).to(layer.lora_magnitude.dtype))

    @torch.no_grad()
    def weight_changed(self, layer: LoRALinear) -> None:
        layer.weight_sq_norm = weight_row_sq_norm(layer.weight_out_in())
        layer._weight_key = (layer.weight.data_ptr(), layer.weight._version)

    def cached_weight_sq_norm(self, layer: LoRALinear) -> Tensor:
        """``‖W_i‖²`` (out,) in at least float32."""
        if not torch.compiler.is_compiling():
            if layer._weight_key != (layer.weight.data_ptr(), layer.weight._version):
                self.weight_changed(layer)
        return layer.weight_sq_norm

    def weight_norm(self, layer: LoRALinear) -> Tensor:
        """n = ‖W + sBA‖_row (out,) in at least float32."""
        return dora_weight_norm(
            layer.weight_out_in(),
            layer.lora_A,
            layer.lora_B,
            layer.scaling,
            self.cached_weight_sq_norm(layer),
        )

    def inference_weight_norm(self, layer: LoRALinear) -> Tensor | None:
        """n for a forward that autograd does not record, reused until W, A or B change; None
        (the op computes n) for a recorded forward or under ``torch.compile``."""
        if torch.compiler.is_compiling():
            return None
        if torch.is_grad_enabled():
            layer._inference_norm = None
            return None
        tensors = (layer.weight, layer.lora_A, layer.lora_B)
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        if layer._inference_norm is None or layer._inference_norm[0] != key:
            layer._inference_norm = (key, self.weight_norm(layer))
        return layer._inference_norm[1]

    def forward(self, layer: LoRALinear, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return dora_linear(
            x,
            weight,
            bias,
            layer.lora_A,
            layer.lora_B,
            layer.lora_magnitude,
            layer.scaling,
            layer.dropout_p,
            training=layer.training,
            backend=layer.backend,
            weight_sq_norm=self.cached_weight_sq_norm(layer),
            weight_norm=self.inference_weight_norm(layer),
        )

    def merge(self, layer: LoRALinear, weight: Tensor) -> Tensor:
        layer._merged_norm = self.weight_norm(layer)
        scale = layer.lora_magnitude.to(weight.dtype) / layer._merged_norm.to(weight.dtype)
        return (weight + layer.delta_weight()) * scale[:, None]

    def unmerge(self, layer: LoRALinear, merged: Tensor) -> Tensor:
        magnitude = layer.lora_magnitude.to(merged.dtype)
        if (magnitude == 0).any():
            raise ValueError("cannot unmerge DoRA: a magnitude entry is 0, W is lost there")
        restored = merged * (layer._merged_norm.to(merged.dtype) / magnitude)[:, None]
        layer._merged_norm = None
        return restored - layer.delta_weight()


LORA_VARIANT = LoRAVariant()
DORA_VARIANT = DoRAVariant()


def variant_for(use_dora: bool) -> LoRAVariant:
    """The variant a config asks for: the one place that reads ``use_dora``."""
    return DORA_VARIANT if use_dora else LORA_VARIANT


def _weight_loaded(layer: LoRALinear, incompatible_keys) -> None:
    """``load_state_dict`` post-hook: W may have been loaded in place."""
    layer.variant.weight_changed(layer)


# -- inits --------------------------------------------------------------------------------------


def _init_default(layer: LoRALinear) -> None:
    """A kaiming-uniform (a=√5, as ``nn.Linear``), B = 0 (Microsoft's reference, peft's True)."""
    nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))
    nn.init.zeros_(layer.lora_B)


def _init_gaussian(layer: LoRALinear) -> None:
    """A ~ N(0, 1/r), B = 0."""
    nn.init.normal_(layer.lora_A, std=1 / layer.r)
    nn.init.zeros_(layer.lora_B)


def _init_random(layer: LoRALinear) -> None:
    """A and B both kaiming-uniform: the adapter acts from the start (tests)."""
    nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))
    nn.init.kaiming_uniform_(layer.lora_B, a=math.sqrt(5))


def _set_residual(layer: LoRALinear, lora_A: Tensor, lora_B: Tensor, weight32: Tensor) -> None:
    """A, B ← the given factors; W ← W − (s·B) A, computed as peft computes it (float32)."""
    layer.lora_A.copy_(lora_A)
    layer.lora_B.copy_(lora_B)
    weight = layer.weight_out_in()
    residual = weight32 - (layer.scaling * layer.lora_B.to(weight32.dtype)) @ layer.lora_A.to(
        weight32.dtype
    )
    weight.copy_(residual.to(weight.dtype))


def _init_pissa(layer: LoRALinear) -> None:
    """PiSSA (Meng et al. 2024): A, B from the top-r SVD of W; W ← W − s·B A."""
    weight32 = layer.weight_out_in().to(torch.promote_types(layer.weight.dtype, torch.float32))
    u, s, vh = torch.linalg.svd(weight32, full_matrices=False)
    root = (s[: layer.r] / layer.scaling).sqrt()
    _set_residual(layer, root[:, None] * vh[: layer.r], u[:, : layer.r] * root[None, :], weight32)


def _init_olora(layer: LoRALinear) -> None:
    """OLoRA (Büyükakyüz 2024): W = QR; A = R[:r], B = Q[:, :r]; W ← W − s·B A."""
    weight32 = layer.weight_out_in().to(torch.promote_types(layer.weight.dtype, torch.float32))
    q, r = torch.linalg.qr(weight32)
    _set_residual(layer, r[: layer.r], q[:, : layer.r], weight32)


INITS = {
    True: _init_default,
    False: _init_random,
    "gaussian": _init_gaussian,
    "pissa": _init_pissa,
    "olora": _init_olora,
}
assert set(INITS) == set(INIT_CHOICES)


def checked_rank(config: LoRAConfig, name: str) -> int:
    """The rank ``config`` gives module ``name`` (``rank_pattern`` included), or ``ValueError``."""
    rank, _ = config.rank_and_alpha(name)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank_pattern gives {name!r} rank {rank!r}; ranks must be ints >= 1")
    return rank


# -- the layer ----------------------------------------------------------------------------------


class LoRALinear(AdapterLayer):
    """LoRA (DoRA with ``use_dora``) around a frozen linear layer.

    ``y = x Wᵀ + b + s·(dropout(x) Aᵀ) Bᵀ``; DoRA: ``y = (m/n) ⊙ (x (W + sBA)ᵀ) + b`` with
    ``n = ‖W + sBA‖_row`` held constant in backward. ``s = α/r`` (rsLoRA ``α/√r``).

    Args:
        base: the ``nn.Linear`` or ``Conv1D`` to adapt (its parameters are shared, not copied).
        r: rank; lora_alpha: α; dropout: dropout on the adapter input.
        use_rslora, use_dora, init_lora_weights: as in ``LoRAConfig``.
        adapter_dtype: dtype of the adapter parameters (float32 by default, whatever W's).
        backend: the ``kernels`` backend.

    Flags: ``merged`` (the update lives in W; forward is the plain layer), ``disabled`` (the
    adapter is skipped). ``merge()`` / ``unmerge()`` are idempotent.
    """

    mergeable = True
    saved_names: ClassVar[dict[str, str]] = {
        "lora_A": "lora_A.weight",
        "lora_B": "lora_B.weight",
        "lora_bias": "lora_B.bias",
        "lora_magnitude": "lora_magnitude_vector",
        "weight": "base_layer.weight",
        "bias": "base_layer.bias",
    }
    fast_names = ("lora_B",)

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
        if not self.adapts(base):
            reason = quantized_reason(base)
            raise TypeError(
                f"LoRALinear adapts nn.Linear or Conv1D, got {type(base).__name__}"
                + (f": {reason}" if reason else "")
            )
        if r < 1:
            raise ValueError(f"rank r must be >= 1, got {r}")
        if lora_bias and use_dora:
            raise ValueError("lora_bias is not supported with DoRA (as in peft)")
        self.fan_in_fan_out = is_conv1d(base)
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        object.__setattr__(self, "base_module", base)  # what unwrap() puts back; not a child
        self.out_features, self.in_features = self.weight_out_in().shape
        self.r, self.lora_alpha, self.dropout_p = r, lora_alpha, float(dropout)
        self.use_rslora, self.backend = use_rslora, backend
        self.variant = variant_for(use_dora)
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        factory = {"device": self.weight.device, "dtype": adapter_dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.lora_bias = (
            nn.Parameter(torch.empty(self.out_features, **factory)) if lora_bias else None
        )
        self.merged = False
        self.disabled = False
        self.variant.create(self, adapter_dtype)
        self.reset_adapter_parameters(init_lora_weights)
        self.train(base.training)

    # -- the protocol, class level --------------------------------------------------------------

    @classmethod
    def adapts(cls, module: nn.Module) -> bool:
        return is_linear_like(module) and quantized_reason(module) is None

    @staticmethod
    def _out_in(module: nn.Module) -> tuple[int, int]:
        out_features, in_features = module.weight.shape
        return (in_features, out_features) if is_conv1d(module) else (out_features, in_features)

    @classmethod
    def check(cls, module: nn.Module, config: LoRAConfig, name: str) -> None:
        rank = checked_rank(config, name)
        init = config.init_lora_weights
        if init in REWRITES_BASE and rank > min(module.weight.shape):
            raise ValueError(
                f"{init} needs r <= min(out, in) = {min(module.weight.shape)} at {name!r}, "
                f"got {rank}"
            )
        if init == "olora" and is_conv1d(module):
            raise ValueError(
                f"olora on {name!r}, a Conv1D (weight stored as (in, out)): peft decomposes the "
                "stored matrix without transposing it, so no result here would match peft's"
            )
        weight = module.weight.T if is_conv1d(module) else module.weight
        variant_for(config.use_dora).check(weight.detach(), config, name)

    @classmethod
    def adapter_shapes(cls, module: nn.Module, config: LoRAConfig, name: str) -> dict:
        rank, _ = config.rank_and_alpha(name)
        out_features, in_features = cls._out_in(module)
        return {
            "lora_A": (rank, in_features),
            "lora_B": (out_features, rank),
            **({"lora_bias": (out_features,)} if config.lora_bias else {}),
            **variant_for(config.use_dora).extra_shapes(out_features, in_features),
        }

    @classmethod
    def build(cls, module: nn.Module, config: LoRAConfig, name: str) -> LoRALinear:
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

    @property
    def use_dora(self) -> bool:
        return isinstance(self.variant, DoRAVariant)

    def adapter_parameter_names(self) -> list[str]:
        bias = ["lora_bias"] if self.lora_bias is not None else []
        return ["lora_A", "lora_B", *bias, *self.variant.parameter_names]

    def adapter_buffer_names(self) -> list[str]:
        return list(self.variant.buffer_names)

    @property
    def base_layer(self) -> nn.Module:
        return self.base_module

    def unwrap(self) -> nn.Module:
        base = self.base_module
        base.weight, base.bias = self.weight, self.bias
        return base

    def describe(self) -> tuple[str, str, int]:
        return self.variant.name, f"{self.in_features}->{self.out_features}", self.r

    # -- weights --------------------------------------------------------------------------------

    def weight_out_in(self) -> Tensor:
        """W as (out, in): the weight itself, or a transposed view for ``Conv1D``."""
        return self.weight.T if self.fan_in_fan_out else self.weight

    @torch.no_grad()
    def reset_adapter_parameters(self, init_lora_weights: bool | str = True) -> None:
        """Initialise A, B (and the variant's tensors) as peft does; ``"pissa"`` and ``"olora"``
        also replace W by its residual."""
        INITS[init_lora_weights](self)
        if self.lora_bias is not None:
            init_lora_bias(self.lora_bias, init_lora_weights, self.r)
        self.variant.init(self)

    # -- forward --------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out).

        The adapters keep their own dtype (float32 on a bfloat16 base: ``kernels`` runs the
        adapter branch in it); under autocast ``kernels`` casts the base operands, as
        ``F.linear`` would.
        """
        # detach(): W is frozen; under FSDP1 (use_orig_params) it arrives as a view of a flat
        # parameter that requires grad because the adapters in the same unit do.
        weight = self.weight_out_in().detach()
        if self.disabled or self.merged:
            return F.linear(x, weight, self.bias)
        bias = self.bias
        if self.lora_bias is not None:
            bias = add_lora_bias(bias, self.lora_bias, self.scaling, weight.dtype)
        return self.variant.forward(self, x, weight, bias)

    # -- merge ----------------------------------------------------------------------------------

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """``s·B A`` (out, in) in float32 (float64 for float64 adapters)."""
        dtype = torch.promote_types(self.lora_A.dtype, torch.float32)
        return self.scaling * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))

    def merge_refusal(self) -> str | None:
        return lora_bias_refusal(self)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into W (``W ← W + sBA``; DoRA ``W ← (m/n) ⊙ (W + sBA)``) and
        ``lora_bias`` into the bias (``b ← b + s·b_B``)."""
        if self.merged:
            return
        reason = self.merge_refusal()
        if reason is not None:
            raise ValueError(reason)
        weight = self.weight_out_in()
        wide = weight.to(torch.promote_types(weight.dtype, torch.float32))
        weight.copy_(self.variant.merge(self, wide))
        self.variant.weight_changed(self)
        if self.lora_bias is not None:
            self.bias.add_((self.lora_bias * self.scaling).to(self.bias.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge()`` (exact up to the rounding of W's dtype)."""
        if not self.merged:
            return
        weight = self.weight_out_in()
        wide = weight.to(torch.promote_types(weight.dtype, torch.float32))
        weight.copy_(self.variant.unmerge(self, wide))
        self.variant.weight_changed(self)
        if self.lora_bias is not None:
            self.bias.sub_((self.lora_bias * self.scaling).to(self.bias.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"{self.variant.name}: in={self.in_features}, out={self.out_features}, r={self.r}, "
            f"alpha={self.lora_alpha}, scaling={self.scaling:.4g}, dropout={self.dropout_p}, "
            f"bias={self.bias is not None}, fan_in_fan_out={self.fan_in_fan_out}"
        )


# -- adapter_config.json ------------------------------------------------------------------------

_PEFT_LORA_FIELDS = (
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "bias",
    "use_rslora",
    "use_dora",
    "init_lora_weights",
    "lora_bias",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "task_type",
)
# Inits that only set the starting A and B (the file then replaces them) and leave W alone:
# peft's load equals a plain LoRA load.
LOADS_AS_DEFAULT = ("eva", "orthogonal")


def write_lora_config(model: nn.Module, config: LoRAConfig, targets: list[str]) -> dict:
    """peft's ``adapter_config.json`` for ``config``, listing the exact modules adapted."""
    name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    data: dict[str, Any] = {name: getattr(config, name) for name in _PEFT_LORA_FIELDS}
    data.update(
        peft_type="LORA",
        inference_mode=True,
        base_model_name_or_path=name_or_path,
        # The exact modules adapted: peft matches a listed full name directly.
        target_modules=targets,
        layers_to_transform=None,
        layers_pattern=None,
        fan_in_fan_out=any(
            getattr(model.get_submodule(t), "fan_in_fan_out", False) for t in targets
        ),
    )
    return data


def read_lora_config(data: dict, path: Path) -> LoRAConfig:
    """A ``LoRAConfig`` from peft's ``adapter_config.json`` content, or a ``ValueError`` naming
    ``path`` and whatever cannot be loaded with peft's numbers."""
    data = {key: value for key, value in data.items() if value is not None}
    init = data.get("init_lora_weights", True)
    if init in LOADS_AS_DEFAULT:
        data["init_lora_weights"] = True
    elif not (isinstance(init, bool) or init in INIT_CHOICES):
        why = next(
            (
                why
                for name, why in PEFT_INITS_NOT_HERE.items()
                if init == name or (name.endswith("_") and str(init).startswith(name))
            ),
            "is not known here",
        )
        raise ValueError(
            f"{path}: init_lora_weights={init!r} {why}; loading this adapter here would not "
            "give peft's numbers, so it is refused"
        )
    known = set(LoRAConfig.__dataclass_fields__)
    for name in sorted(set(data) - known):
        if data[name] in (False, [], {}, ""):
            del data[name]  # a newer peft's field at an inert value
        else:
            raise ValueError(
                f"{path}: {name}={data[name]!r} is a field this package does not know (a newer "
                "peft?); refusing rather than ignoring it"
            )
    try:
        return LoRAConfig(**data)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None


# The quantized layer builds on this module's inits and checks, so it is imported last.
from lightning_peft.methods.lora_quantized import QuantizedLoRALinear  # noqa: E402

LORA = Method(
    name="lora",
    peft_type="LORA",
    config_cls=LoRAConfig,
    layers=(QuantizedLoRALinear, LoRALinear, LoRAEmbedding, LoRAConv, LoRAMultiheadAttention),
    write_config=write_lora_config,
    read_config=read_lora_config,
    scope=(
        "LoRA adapts nn.Linear, Conv1D, nn.Embedding, nn.Conv1d/2d/3d, nn.MultiheadAttention "
        "and bitsandbytes' Linear4bit/Linear8bitLt"
    ),
)
