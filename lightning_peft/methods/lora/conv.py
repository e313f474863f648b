"""LoRA and DoRA on ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (grouped included): a thin
layer over ``peft_kernels.lora_conv`` / ``peft_kernels.dora_conv``.

As peft's ``lora.Conv{1,2,3}d``: ``lora_A`` (r, in, *k) is a convolution over all input channels
with the base's kernel, stride and padding; ``lora_B`` (out, r/groups, 1, …) a 1×…×1
convolution with the base's groups; ``y = conv(x, W) + b + s·B(A(dropout(x)))``. DoRA's magnitude
is per output channel, stored as peft stores it, (1, out, 1, …). ``lora_bias`` adds B's bias.
Refused by name: a rank that is not a multiple of ``groups`` (as peft), dilation ≠ 1 and
``padding_mode`` ≠ ``"zeros"`` (peft's ``lora_A`` ignores both, so its adapter would not be the
update of this convolution), subclasses with their own forward, and the inits that rewrite W
(PiSSA, OLoRA; peft has none for convolutions). Grouped convolutions do not merge (their update
is dense across groups; peft refuses too).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_peft.methods.lora.base import LoRALayer, compute_dtype
from lightning_peft.methods.lora.config import REWRITES_BASE, LoRAConfig
from peft_kernels import (
    conv_delta_weight,
    conv_dora_weight_norm,
    dora_conv,
    lora_conv,
    weight_row_sq_norm,
)

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _conv_type(module: nn.Module) -> type[nn.Module]:
    return next(t for t in CONV_TYPES if isinstance(module, t))


class LoRAConv(LoRALayer):
    """LoRA / DoRA around a frozen ``nn.Conv1d`` / ``Conv2d`` / ``Conv3d``.

    Args (as ``LoRALayer``): base, r, lora_alpha, dropout, use_rslora, use_dora,
    lora_bias, init_lora_weights (True: A kaiming-uniform, B zero; "gaussian": A ~ N(0, 1/r),
    B zero; False: both random), adapter_dtype.
    """

    adapts_kinds = ("nn.Conv1d/2d/3d",)

    row_noun = "output channel"
    # ``dora_conv`` computes n itself (it takes no precomputed norm).
    reuses_inference_norm = False

    # -- declarations ---------------------------------------------------------------------------

    @classmethod
    def adapts(cls, module: nn.Module) -> bool:
        return isinstance(module, CONV_TYPES)

    @classmethod
    def factor_shapes(cls, module: nn.Module, rank: int) -> dict[str, tuple[int, ...]]:
        kernel = tuple(module.weight.shape[2:])
        return {
            "lora_A": (rank, module.in_channels, *kernel),
            "lora_B": (module.out_channels, rank // module.groups, *(1,) * len(kernel)),
        }

    @classmethod
    def magnitude_shape_of(cls, module: nn.Module) -> tuple[int, ...]:
        return (1, module.out_channels, *(1,) * (module.weight.dim() - 2))

    @classmethod
    def weight_sq_norm_of(cls, module: nn.Module) -> Tensor:
        weight = module.weight
        return weight_row_sq_norm(weight.reshape(weight.shape[0], -1))

    @classmethod
    def check_module(cls, module: nn.Module, config: LoRAConfig, name: str, rank: int) -> None:
        kind = _conv_type(module)
        label = f"{name!r} (a {type(module).__name__})"
        if (type(module).forward, type(module)._conv_forward) != (kind.forward, kind._conv_forward):
            raise ValueError(
                f"{label} has its own forward; LoRA computes the base convolution from its "
                f"weight as nn.{kind.__name__} does, which would not be this module's output"
            )
        if rank % module.groups:
            raise ValueError(
                f"{label} has groups={module.groups}; the rank ({rank}) must be a multiple of "
                "groups, as in peft: choose another r (rank_pattern) or exclude the module"
            )
        if any(d != 1 for d in module.dilation):
            raise ValueError(
                f"{label} has dilation={module.dilation}; peft's LoRA convolution ignores "
                "dilation, so its adapter would not be an update of this convolution: exclude "
                "the module"
            )
        if module.padding_mode != "zeros":
            raise ValueError(
                f"{label} pads with padding_mode={module.padding_mode!r}; peft's LoRA "
                "convolution pads with zeros, so its adapter would not be an update of this "
                "convolution: exclude the module"
            )
        if config.init_lora_weights in REWRITES_BASE:
            raise ValueError(
                f"init_lora_weights={config.init_lora_weights!r} is not available for "
                f"convolutions ({label}); peft has none either: use True or 'gaussian'"
            )

    # -- hooks ----------------------------------------------------------------------------------

    def geometry(self) -> dict:
        base = self.base_module
        return {
            "stride": base.stride,
            "padding": base.padding,
            "dilation": base.dilation,
            "groups": base.groups,
        }

    # x (batch, in, *spatial) -> (batch, out, *spatial_out). x, W and b go to the compute dtype
    # (the autocast dtype under autocast, as a convolution's operands would); the adapters keep
    # their own dtype, or x's where that is wider: float32 adapters on a bfloat16 base run the
    # branch in float32 and the sum is rounded once, as peft does (``peft_kernels.lora_conv``).

    def _args(self, x: Tensor) -> tuple[torch.dtype, tuple]:
        """(adapter dtype, the op's positional arguments up to B)."""
        dtype = compute_dtype(x)
        # detach(): W is frozen (under FSDP1 it can arrive as a view that requires grad).
        weight = self.weight.detach().to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        wide = torch.promote_types(dtype, self.lora_A.dtype)
        return wide, (x.to(dtype), weight, bias, *self._factors(wide))

    def _factors(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return self.lora_A.to(dtype), self.lora_B.to(dtype)

    def lora_output(self, x: Tensor) -> Tensor:
        wide, args = self._args(x)
        lora_bias = None if self.lora_bias is None else self.lora_bias.to(wide)
        with torch.autocast(x.device.type, enabled=False):
            return lora_conv(
                *args,
                self.scaling,
                self.dropout_p,
                training=self.training,
                lora_bias=lora_bias,
                **self.geometry(),
            )

    def dora_output(self, x: Tensor, weight_sq_norm: Tensor, weight_norm: None) -> Tensor:
        wide, args = self._args(x)
        magnitude = self.lora_magnitude.reshape(-1).to(wide)
        with torch.autocast(x.device.type, enabled=False):
            return dora_conv(
                *args,
                magnitude,
                self.scaling,
                self.dropout_p,
                training=self.training,
                weight_sq_norm=weight_sq_norm,
                **self.geometry(),
            )

    def base_output(self, x: Tensor) -> Tensor:
        return self.base_module._conv_forward(x, self.weight, self.bias)

    def delta_weight(self) -> Tensor:
        """``s·ΔW`` (out, in, *k) in float32 (float64 for float64 adapters); groups = 1 only."""
        return conv_delta_weight(*self._factors(self._wide_dtype()), self.scaling)

    def dora_norm(self, weight_sq_norm: Tensor) -> Tensor:
        return conv_dora_weight_norm(
            self.weight,
            *self.factors(),
            self.scaling,
            groups=self.base_module.groups,
            weight_sq_norm=weight_sq_norm,
        )

    def _wide_dtype(self) -> torch.dtype:
        return torch.promote_types(self.lora_A.dtype, torch.float32)

    def merge_refusal(self) -> str | None:
        groups = self.base_module.groups
        if groups > 1:
            return (
                f"LoRA on a grouped convolution (groups={groups}) cannot be merged: its update "
                "reads all input channels, so it has no place in the grouped weight (peft "
                "refuses this merge too); keep the adapter unmerged"
            )
        return super().merge_refusal()

    def describe(self) -> tuple[str, str, int]:
        base = self.base_module
        kernel = "x".join(map(str, base.kernel_size))
        groups = f", groups={base.groups}" if base.groups > 1 else ""
        shape = f"{base.in_channels}->{base.out_channels} {kernel} conv{groups}"
        return self.variant.name, shape, self.r
