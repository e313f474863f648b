"""QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314): LoRA and DoRA over a frozen
bitsandbytes ``Linear4bit`` (nf4 or fp4, with or without double quantization, any compute dtype)
or ``Linear8bitLt`` (int8).

The base stays quantized and computes its own product: ``base(x) = x Wᵀ + b`` comes from the
bitsandbytes layer (its autograd gives ``grad_x`` by de-quantizing W inside backward), the adapter
branch from ``kernels.lora_delta`` and, for DoRA, the output from ``kernels.dora_combine``:

- LoRA: ``y = base(x) + s·(dropout(x) Aᵀ) Bᵀ``.
- DoRA: ``y = (m/n) ⊙ (base(x) − b + s·(x Aᵀ) Bᵀ) + b`` (dropout on, peft's definition:
  ``y = base(x) + (m/n − 1) ⊙ (base(x̃) − b) + (m/n) ⊙ s·(x̃ Aᵀ) Bᵀ``), with
  ``n = ‖W + sBA‖_row`` from the factored norm: ``‖W_i‖²`` cached once (the base is frozen) and
  ``W Aᵀ`` per forward, both from the de-quantized weight in row chunks; no full-precision copy
  of W is kept or saved for backward.

The adapters (``lora_A``, ``lora_B``, DoRA's ``lora_magnitude``) live in their own dtype
(``adapter_dtype``, float32 by default) and compute in the input's (or autocast's) dtype. The
layer holds the base's ``weight`` and ``bias`` under the same names and writes the base's
bitsandbytes state-dict entries (``weight.absmax``, ``SCB``, ...) as the base does, so the frozen
state-dict keys do not change; the saved adapter keys are LoRA's, so files load in peft over the
same quantized base and back.

Merging never re-quantizes (peft's merge re-quantizes ``W + sBA`` to 4 bits, rounding most of
the update away): ``merge()`` de-quantizes W once and holds the merged float weight, the layer
then runs as that float linear layer, ``unmerge()`` drops it and the untouched quantized base
runs again. ``unload(merge=True)`` hands back that float ``nn.Linear``: the export path.
"""

from __future__ import annotations

import math
import warnings
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels import dora_combine, factored_weight_norm, lora_delta
from lightning_peft.config import REWRITES_BASE, LoRAConfig
from lightning_peft.methods.base import AdapterLayer, keep_adapter_dtype
from lightning_peft.methods.lora import (
    INITS,
    LoRALinear,
    checked_rank,
    refuse_zero_rows,
    variant_for,
)
from lightning_peft.quantization import (
    bitsandbytes_kind,
    dequantized_dtype,
    dequantized_weight,
    disable_cpu_inference_packing,
    quantized_row_sq_norm,
    quantized_weight_times,
    unpack_cpu_inference_layout,
    unusable_reason,
)

# -- variants -----------------------------------------------------------------------------------


class QuantizedLoRAVariant:
    """LoRA over a quantized base: ``y = base(x) + s·(dropout(x) Aᵀ) Bᵀ``; the interface."""

    name = "LoRA"
    parameter_names: tuple[str, ...] = ()
    buffer_names: tuple[str, ...] = ()

    def check(self, module: nn.Module, config: LoRAConfig, name: str) -> None:
        """Raise ``ValueError`` naming ``name`` if the variant cannot adapt ``module``."""

    def create(self, layer: QuantizedLoRALinear, adapter_dtype: torch.dtype) -> None:
        """Register the variant's tensors on ``layer`` (uninitialised)."""

    def init(self, layer: QuantizedLoRALinear) -> None:
        """Initialise the variant's tensors once A and B are set."""

    def weight_changed(self, layer: QuantizedLoRALinear) -> None:
        """The quantized weight was loaded anew: refresh what depends on it."""

    def forward(self, layer: QuantizedLoRALinear, x: Tensor, base: Tensor) -> Tensor:
        """``x`` and the base output ``base`` already in the compute dtype."""
        lora_A, lora_B = layer.lora_A.to(x.dtype), layer.lora_B.to(x.dtype)
        delta = lora_delta(
            x,
            lora_A,
            lora_B,
            layer.scaling,
            layer.dropout_p,
            training=layer.training,
            backend=layer.backend,
        )
        return base + delta

    def merged(self, layer: QuantizedLoRALinear, weight: Tensor) -> Tensor:
        """The merged weight (out, in) from the de-quantized W, in at least float32."""
        return weight + layer.delta_weight()


class QuantizedDoRAVariant(QuantizedLoRAVariant):
    """DoRA over a quantized base (see the module docstring); ``‖W_i‖²`` is cached in the
    non-persistent buffer ``weight_sq_norm``, refreshed when a state dict loads the weight.

    A de-quantized weight with an all-zero row is refused at injection, as for DoRA over a float
    base (``m/n`` would be 0/0 there)."""

    name = "DoRA"
    parameter_names = ("lora_magnitude",)
    buffer_names = ("weight_sq_norm",)

    def check(self, module: nn.Module, config: LoRAConfig, name: str) -> None:
        if config.init_lora_weights is not False:  # B random: n_i > 0
            refuse_zero_rows(quantized_row_sq_norm(module), name)

    def create(self, layer: QuantizedLoRALinear, adapter_dtype: torch.dtype) -> None:
        layer.lora_magnitude = nn.Parameter(
            torch.empty(layer.out_features, device=layer.lora_A.device, dtype=adapter_dtype)
        )
        layer.register_buffer("weight_sq_norm", None, persistent=False)
        layer.register_load_state_dict_post_hook(_weight_loaded)

    @torch.no_grad()
    def init(self, layer: QuantizedLoRALinear) -> None:
        self.weight_changed(layer)
        layer.lora_magnitude.copy_(self.weight_norm(layer).to(layer.lora_magnitude.dtype))

    def weight_changed(self, layer: QuantizedLoRALinear) -> None:
        layer.weight_sq_norm = quantized_row_sq_norm(layer.base_module)

    def weight_norm(self, layer: QuantizedLoRALinear) -> Tensor:
        """n = ‖W + sBA‖_row (out,), detached, in at least float32."""
        weight_a = quantized_weight_times(layer.base_module, layer.lora_A)  # W Aᵀ (out, r)
        return factored_weight_norm(
            weight_a, layer.weight_sq_norm, layer.lora_A, layer.lora_B, layer.scaling
        )

    def forward(self, layer: QuantizedLoRALinear, x: Tensor, base: Tensor) -> Tensor:
        dtype = x.dtype
        lora_A, lora_B = layer.lora_A.to(dtype), layer.lora_B.to(dtype)
        bias = None if layer.bias is None else layer.bias.to(dtype)
        base_dropped = None
        if layer.training and layer.dropout_p > 0:
            x = F.dropout(x, layer.dropout_p, training=True)
            base_dropped = layer.base_module(x).to(dtype)
        delta = lora_delta(x, lora_A, lora_B, layer.scaling, backend=layer.backend)
        return dora_combine(
            base,
            delta,
            layer.lora_magnitude.to(dtype),
            self.weight_norm(layer),
            bias,
            base_dropped,
            backend=layer.backend,
        )

    def merged(self, layer: QuantizedLoRALinear, weight: Tensor) -> Tensor:
        norm = self.weight_norm(layer).to(weight.dtype)
        scale = layer.lora_magnitude.to(weight.dtype) / norm
        return (weight + layer.delta_weight()) * scale[:, None]


QUANTIZED_LORA = QuantizedLoRAVariant()
QUANTIZED_DORA = QuantizedDoRAVariant()


def _weight_loaded(layer: QuantizedLoRALinear, incompatible_keys) -> None:
    """``load_state_dict`` post-hook: the quantized weight may have been loaded anew."""
    layer.variant.weight_changed(layer)


def quantization_label(module: nn.Module) -> str:
    """``"nf4"``, ``"fp4-dq"`` (double quantization), ``"int8"``: how ``module`` is quantized."""
    if bitsandbytes_kind(module) == "8bit":
        return "int8"
    state = module.weight.quant_state
    return state.quant_type + ("-dq" if state.nested else "")


# -- the layer ----------------------------------------------------------------------------------


class QuantizedLoRALinear(AdapterLayer):
    """LoRA (DoRA with ``use_dora``) around a frozen bitsandbytes ``Linear4bit``/``Linear8bitLt``.

    Args:
        base: the quantized layer (its weight quantized already; its parameters are shared).
        r, lora_alpha, dropout, use_rslora, use_dora, init_lora_weights, adapter_dtype,
            backend: as in ``LoRALinear`` (``init_lora_weights`` True, False or "gaussian":
            PiSSA and OLoRA rewrite the base weight and are refused).

    Flags: ``merged`` (the layer runs as the float linear layer of ``W + sBA``), ``disabled``
    (the base alone). bitsandbytes' bf16 CPU inference repacking is switched off for the base
    (``lightning_peft.quantization.disable_cpu_inference_packing``: it drops ``grad_x`` after an
    eval forward), and stays off after ``unwrap()``.
    """

    mergeable = True
    saved_names: ClassVar[dict[str, str]] = LoRALinear.saved_names
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
        init_lora_weights: bool | str = True,
        adapter_dtype: torch.dtype = torch.float32,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if bitsandbytes_kind(base) is None:
            raise TypeError(
                "QuantizedLoRALinear adapts bitsandbytes' Linear4bit or Linear8bitLt, got "
                f"{type(base).__name__}"
            )
        reason = unusable_reason(base)
        if reason is not None:
            raise ValueError(f"cannot adapt {reason}")
        if r < 1:
            raise ValueError(f"rank r must be >= 1, got {r}")
        if init_lora_weights in REWRITES_BASE:
            raise ValueError(_rewrite_refusal(init_lora_weights, base, "this layer"))
        unpack_cpu_inference_layout(base)
        disable_cpu_inference_packing(base)  # inject_adapters does so for the whole model
        self.weight = base.weight
        self.bias = base.bias
        object.__setattr__(self, "base_module", base)  # what unwrap() puts back; not a child
        self.out_features, self.in_features = base.out_features, base.in_features
        self.r, self.lora_alpha, self.dropout_p = r, lora_alpha, float(dropout)
        self.use_rslora, self.backend = use_rslora, backend
        self.variant = QUANTIZED_DORA if use_dora else QUANTIZED_LORA
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        factory = {"device": self.weight.device, "dtype": adapter_dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.register_buffer("merged_weight", None, persistent=False)
        self.merged = False
        self.disabled = False
        self.variant.create(self, adapter_dtype)
        with torch.no_grad():
            INITS[init_lora_weights](self)
            self.variant.init(self)
        self.train(base.training)

    # -- the protocol, class level --------------------------------------------------------------

    @classmethod
    def adapts(cls, module: nn.Module) -> bool:
        return bitsandbytes_kind(module) is not None

    @classmethod
    def check(cls, module: nn.Module, config: LoRAConfig, name: str) -> None:
        checked_rank(config, name)
        reason = unusable_reason(module)
        if reason is not None:
            raise ValueError(f"target {name!r} is {reason}")
        if config.init_lora_weights in REWRITES_BASE:
            raise ValueError(_rewrite_refusal(config.init_lora_weights, module, repr(name)))
        if getattr(config, "lora_bias", False):
            raise ValueError(
                f"lora_bias=True over {name!r}, a bitsandbytes {type(module).__name__} "
                f"({quantization_label(module)}), is not supported yet (the adapter branch over "
                "a quantized base has no bias): use lora_bias=False"
            )
        (QUANTIZED_DORA if config.use_dora else QUANTIZED_LORA).check(module, config, name)

    @classmethod
    def adapter_shapes(cls, module: nn.Module, config: LoRAConfig, name: str) -> dict:
        rank, _ = config.rank_and_alpha(name)
        out_features, in_features = module.out_features, module.in_features
        return {
            "lora_A": (rank, in_features),
            "lora_B": (out_features, rank),
            **variant_for(config.use_dora).extra_shapes(out_features, in_features),
        }

    @classmethod
    def build(cls, module: nn.Module, config: LoRAConfig, name: str) -> QuantizedLoRALinear:
        rank, alpha = config.rank_and_alpha(name)
        return cls(
            module,
            rank,
            alpha,
            dropout=config.lora_dropout,
            use_rslora=config.use_rslora,
            use_dora=config.use_dora,
            init_lora_weights=config.init_lora_weights,
            adapter_dtype=getattr(torch, config.adapter_dtype),
            backend=config.backend,
        )

    # -- the protocol, instance -----------------------------------------------------------------

    @property
    def use_dora(self) -> bool:
        return self.variant is QUANTIZED_DORA

    def adapter_parameter_names(self) -> list[str]:
        return ["lora_A", "lora_B", *self.variant.parameter_names]

    def adapter_buffer_names(self) -> list[str]:
        return list(self.variant.buffer_names)

    @property
    def base_layer(self) -> nn.Module:
        return self.base_module

    def unwrap(self) -> nn.Module:
        """The quantized base, or (merged) a float ``nn.Linear`` holding the merged weight."""
        if self.merged:
            weight = self.merged_weight
            linear = nn.Linear(
                self.in_features, self.out_features, bias=self.bias is not None, device="meta"
            )
            linear.weight = nn.Parameter(weight, requires_grad=False)
            if self.bias is not None:
                linear.bias = (
                    self.bias
                    if self.bias.dtype == weight.dtype
                    else nn.Parameter(self.bias.detach().to(weight.dtype), self.bias.requires_grad)
                )
            return linear.train(self.training)
        base = self.base_module
        base.weight, base.bias = self.weight, self.bias
        return base

    def describe(self) -> tuple[str, str, int]:
        kind = f"{self.variant.name} over {quantization_label(self.base_module)}"
        return kind, f"{self.in_features}->{self.out_features}", self.r

    # -- forward --------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out)."""
        if self.merged:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.merged_weight.to(x.dtype), bias)
        base = self.base_module(x)
        if self.disabled:
            return base
        dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            return self.variant.forward(self, x.to(dtype), base.to(dtype))

    # -- merge ----------------------------------------------------------------------------------

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """``s·B A`` (out, in) in float32 (float64 for float64 adapters)."""
        dtype = torch.promote_types(self.lora_A.dtype, torch.float32)
        return self.scaling * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))

    def merge(self) -> None:
        """Hold the merged float weight ``W + sBA`` (DoRA ``(m/n) ⊙ (W + sBA)``), W de-quantized
        once, in W's de-quantized dtype; the layer then runs as that float linear layer. The
        quantized base is kept untouched (never re-quantized: no rounding of the update)."""
        if self.merged:
            return
        dtype = dequantized_dtype(self.base_module)
        with torch.no_grad():
            wide = torch.promote_types(dtype, self.delta_weight().dtype)
            weight = dequantized_weight(self.base_module, wide)
            self.merged_weight = self.variant.merged(self, weight).to(dtype)
        self.merged = True
        mib = self.merged_weight.numel() * self.merged_weight.element_size() / 2**20
        warnings.warn(
            f"merging into a quantized ({quantization_label(self.base_module)}) layer "
            "de-quantizes it: "
            f"it now also holds a {dtype} weight ({mib:.1f} MiB); unmerge() drops it, "
            "unload(merge=True) keeps only it (a float model to export)",
            stacklevel=2,
        )

    @torch.no_grad()
    def unmerge(self) -> None:
        """Drop the merged float weight: the quantized base runs again, exactly as before."""
        self.merged_weight = None
        self.merged = False

    # -- module plumbing ------------------------------------------------------------------------

    def train(self, mode: bool = True) -> QuantizedLoRALinear:
        # The base is no child, but its mode matters (int8: inference and training matmuls).
        super().train(mode)
        self.base_module.train(mode)
        return self

    def _apply(self, fn, recurse=True):
        names = self.adapter_parameter_names() + self.adapter_buffer_names()
        result = keep_adapter_dtype(self, names, fn, recurse)
        base = self.base_module  # moves may have replaced the parameters: share them again
        base.weight, base.bias = self.weight, self.bias
        return result

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # The base's own entries under the same keys: weight, bias and bitsandbytes' quantization
        # state (weight.absmax, weight.quant_map, ... for 4-bit; SCB, weight_format for 8-bit).
        self.base_module._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ):
        # The base loads its keys as it would unadapted (8-bit: SCB); a key is unexpected only
        # when neither the base nor the adapter knows it.
        base_unexpected: list[str] = []
        self.base_module._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, [], base_unexpected, errors
        )
        own_unexpected: list[str] = []
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, own_unexpected, errors
        )
        unexpected_keys.extend(k for k in own_unexpected if k in base_unexpected)

    def extra_repr(self) -> str:
        return (
            f"{self.variant.name} over {quantization_label(self.base_module)}: "
            f"in={self.in_features}, out={self.out_features}, r={self.r}, "
            f"alpha={self.lora_alpha}, scaling={self.scaling:.4g}, dropout={self.dropout_p}, "
            f"bias={self.bias is not None}"
        )


def _rewrite_refusal(init: str, module: nn.Module, where: str) -> str:
    return (
        f"init_lora_weights={init!r} rewrites the base weight (W ← W − s·B A), but {where} is a "
        f"bitsandbytes {type(module).__name__} ({quantization_label(module)}), which cannot hold "
        "that residual: use init_lora_weights=True or 'gaussian', or adapt a float base"
    )
