"""QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314): LoRA and DoRA over a frozen
bitsandbytes ``Linear4bit`` (nf4 or fp4, with or without double quantization, any compute dtype)
or ``Linear8bitLt`` (int8).

The base stays quantized and computes its own product: ``base(x) = x Wᵀ + b`` comes from the
bitsandbytes layer (its autograd gives ``grad_x`` by de-quantizing W inside backward), the adapter
branch from ``peft_kernels.lora_delta`` and, for DoRA, the output from ``dora_combine``:

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

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_peft.core.adapter import keep_adapter_dtype
from lightning_peft.core.bnb import (
    bitsandbytes_kind,
    dequantized_dtype,
    dequantized_weight,
    disable_cpu_inference_packing,
    quantized_row_sq_norm,
    quantized_weight_times,
    unpack_cpu_inference_layout,
    unusable_reason,
)
from lightning_peft.methods.lora.base import LoRALayer, compute_dtype
from lightning_peft.methods.lora.config import REWRITES_BASE, LoRAConfig
from peft_kernels import dora_combine, factored_weight_norm, lora_delta


def quantization_label(module: nn.Module) -> str:
    """``"nf4"``, ``"fp4-dq"`` (double quantization), ``"int8"``: how ``module`` is quantized."""
    if bitsandbytes_kind(module) == "8bit":
        return "int8"
    state = module.weight.quant_state
    return state.quant_type + ("-dq" if state.nested else "")


class QuantizedLoRALinear(LoRALayer):
    """LoRA (DoRA with ``use_dora``) around a frozen bitsandbytes ``Linear4bit``/``Linear8bitLt``.

    Args (as ``LoRALayer``): base (the quantized layer, its weight quantized already; its
    parameters are shared), r, lora_alpha, dropout, use_rslora, use_dora, init_lora_weights
    (True, False or "gaussian": PiSSA and OLoRA rewrite the base weight and are refused),
    adapter_dtype, backend. No ``lora_bias``.

    Flags: ``merged`` (the layer runs as the float linear layer of ``W + sBA``), ``disabled``
    (the base alone). bitsandbytes' bf16 CPU inference repacking is switched off for the base
    (``lightning_peft.core.bnb.disable_cpu_inference_packing``: it drops ``grad_x`` after an
    eval forward), and stays off after ``unwrap()``.
    """

    supports_named = False  # one adapter per module (named adapters: docs/named-adapters.md)

    adapts_kinds = ("bitsandbytes' Linear4bit/Linear8bitLt",)
    over_quantized = True

    supports_lora_bias = False

    # -- declarations ---------------------------------------------------------------------------

    @classmethod
    def adapts(cls, module: nn.Module) -> bool:
        return bitsandbytes_kind(module) is not None

    @classmethod
    def base_refusal(cls, base: nn.Module) -> str | None:
        if cls.adapts(base):
            return None
        return (
            "QuantizedLoRALinear adapts bitsandbytes' Linear4bit or Linear8bitLt, got "
            f"{type(base).__name__}"
        )

    @classmethod
    def out_in_of(cls, module: nn.Module) -> tuple[int, int]:
        return module.out_features, module.in_features  # the packed weight's shape says nothing

    @classmethod
    def weight_sq_norm_of(cls, module: nn.Module) -> Tensor:
        return quantized_row_sq_norm(module)

    @classmethod
    def check_module(cls, module: nn.Module, config: LoRAConfig, name: str, rank: int) -> None:
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

    def share_base(self, base: nn.Module) -> None:
        reason = unusable_reason(base)
        if reason is not None:
            raise ValueError(f"cannot adapt {reason}")
        unpack_cpu_inference_layout(base)
        disable_cpu_inference_packing(base)  # inject_adapters does so for the whole model
        self.weight = base.weight
        self.bias = base.bias
        self.register_buffer("merged_weight", None, persistent=False)
        self.out_features, self.in_features = base.out_features, base.in_features

    def init_factors(self, init_lora_weights: bool | str) -> None:
        if init_lora_weights in REWRITES_BASE:
            raise ValueError(_rewrite_refusal(init_lora_weights, self.base_module, "this layer"))
        super().init_factors(init_lora_weights)

    # -- the protocol, instance -----------------------------------------------------------------

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
        return super().unwrap()

    def describe(self) -> tuple[str, str, int]:
        kind = f"{self.variant.name} over {quantization_label(self.base_module)}"
        return kind, f"{self.in_features}->{self.out_features}", self.r

    # -- forward: the base's own product, the adapter branch from kernels -----------------------

    def base_output(self, x: Tensor) -> Tensor:
        if self.merged:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.merged_weight.to(x.dtype), bias)
        return self.base_module(x)

    def lora_output(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out): ``base(x) + s·(dropout(x) Aᵀ) Bᵀ``."""
        base = self.base_module(x)
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(dtype)
            delta = lora_delta(
                x,
                self.lora_A.to(dtype),
                self.lora_B.to(dtype),
                self.scaling,
                self.dropout_p,
                training=self.training,
                backend=self.backend,
            )
            return base.to(dtype) + delta

    def dora_output(self, x: Tensor, weight_sq_norm: Tensor, weight_norm: Tensor | None) -> Tensor:
        """x (..., in) -> (..., out): DoRA over the base's product (the module docstring)."""
        base = self.base_module(x)
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            if weight_norm is None:
                weight_norm = self.dora_norm(weight_sq_norm)
            x, base = x.to(dtype), base.to(dtype)
            bias = None if self.bias is None else self.bias.to(dtype)
            base_dropped = None
            if self.training and self.dropout_p > 0:
                x = F.dropout(x, self.dropout_p, training=True)
                base_dropped = self.base_module(x).to(dtype)
            lora_A, lora_B = self.lora_A.to(dtype), self.lora_B.to(dtype)
            delta = lora_delta(x, lora_A, lora_B, self.scaling, backend=self.backend)
            return dora_combine(
                base,
                delta,
                self.lora_magnitude.to(dtype),
                weight_norm,
                bias,
                base_dropped,
                backend=self.backend,
            )

    def dora_norm(self, weight_sq_norm: Tensor) -> Tensor:
        """n = ‖W + sBA‖_row (out,), detached, in at least float32, from ``W Aᵀ`` computed on
        the de-quantized weight in row chunks."""
        with torch.autocast(self.weight.device.type, enabled=False):  # whoever asks: the same n
            weight_a = quantized_weight_times(self.base_module, self.lora_A)  # W Aᵀ (out, r)
            return factored_weight_norm(
                weight_a, weight_sq_norm, self.lora_A, self.lora_B, self.scaling
            )

    def compute_weight_sq_norm(self) -> Tensor:
        return quantized_row_sq_norm(self.base_module)

    # -- merge: a float copy, never a re-quantized W ----------------------------------------------

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
            self.merged_weight = self.variant.merge(self, weight).to(dtype)
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
