"""(IA)³ (Liu et al. 2022, https://arxiv.org/abs/2205.05638): one learned vector per adapted
layer that rescales its output, or, for feed-forward layers, its input.

``IA3Linear`` adapts a frozen ``nn.Linear`` or transformers ``Conv1D``; ``IA3Conv`` an
``nn.Conv2d`` or ``nn.Conv3d`` (the layer types peft's IA³ adapts). Both are thin modules over
``peft_kernels.ia3``, take their target's place holding its own ``weight`` and ``bias`` (the frozen
state-dict keys do not change), keep peft's tensor ``ia3_l`` in peft's shape ((out, 1) / (1, in)
for linear layers, (1, C, 1, 1[, 1]) for convolutions) and merge exactly: ``W ← diag(l) W``,
``b ← l ⊙ b`` (output) or ``W ← W diag(l)`` (input).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_peft.core.adapter import (
    AdapterLayer,
    Method,
    base_model_name,
    config_from_file,
    is_conv1d,
    is_linear_like,
    quantized_reason,
)
from lightning_peft.core.matching import name_matches
from lightning_peft.methods.ia3.cli import COMMAND_LINE
from lightning_peft.methods.ia3.config import IA3Config, feedforward_match
from peft_kernels import ia3_linear, ia3_merge, ia3_scale


class _IA3Layer(AdapterLayer):
    """What the (IA)³ layers share: the vector, its init, the flags, merge and unmerge.

    Subclasses say how many features are scaled (``vector_shape``), how the weight is viewed
    (``weight_view``: (out, in) for linear layers, (out, in / groups, *kernel) for convs), the
    weight's groups, and the forward.
    """

    mergeable = True
    saved_names: ClassVar[dict[str, str]] = {
        "ia3_l": "ia3_l",
        "weight": "base_layer.weight",
        "bias": "base_layer.bias",
    }
    groups = 1

    def __init__(
        self,
        base: nn.Module,
        feedforward: bool,
        *,
        init_ia3_weights: bool = True,
        adapter_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if not self.adapts(base):
            reason = quantized_reason(base)
            raise TypeError(
                f"{type(self).__name__} cannot adapt a {type(base).__name__}"
                + (f": {reason}" if reason else "")
            )
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        object.__setattr__(self, "base_module", base)  # what unwrap() puts back; not a child
        self.feedforward = feedforward
        self.fan_in_fan_out = is_conv1d(base)  # W stored as (in, out): GPT-2's Conv1D
        self.ia3_l = nn.Parameter(
            torch.empty(
                self.vector_shape(base, feedforward), device=self.weight.device, dtype=adapter_dtype
            )
        )
        self.merged = False
        self.disabled = False
        self.reset_adapter_parameters(init_ia3_weights)
        self.train(base.training)

    @classmethod
    def vector_shape(cls, module: nn.Module, feedforward: bool) -> tuple[int, ...]:
        raise NotImplementedError

    # -- the protocol ---------------------------------------------------------------------------

    @classmethod
    def adapter_shapes(cls, module: nn.Module, config: IA3Config, name: str) -> dict:
        return {"ia3_l": cls.vector_shape(module, config.is_feedforward(name))}

    @classmethod
    def build(cls, module: nn.Module, config: IA3Config, name: str) -> _IA3Layer:
        return cls(
            module,
            config.is_feedforward(name),
            init_ia3_weights=config.init_ia3_weights,
            adapter_dtype=getattr(torch, config.adapter_dtype),
        )

    def adapter_parameter_names(self) -> list[str]:
        return ["ia3_l"]

    @property
    def base_layer(self) -> nn.Module:
        return self.base_module

    def unwrap(self) -> nn.Module:
        base = self.base_module
        base.weight, base.bias = self.weight, self.bias
        return base

    @torch.no_grad()
    def reset_adapter_parameters(self, init_ia3_weights: bool = True) -> None:
        """Ones (peft's ``init_ia3_weights=True``: the base model unchanged), else N(0, 1)."""
        if init_ia3_weights:
            nn.init.ones_(self.ia3_l)
        else:
            nn.init.normal_(self.ia3_l)

    # -- named adapters -------------------------------------------------------------------------

    supports_named = True

    def compose(self, x: Tensor, layers: list[_IA3Layer]) -> Tensor:
        """The site with ``layers`` active together: their vectors multiply (peft's
        ``ia3_scaling *= l``), one scaled forward; disabled layers are skipped, and a site with
        a merged adapter runs as its (merged) base."""
        layers = [layer for layer in layers if not layer.disabled]
        if self.merged or any(layer.merged for layer in layers) or not layers:
            return self.scaled_forward(x, None)
        scale = layers[0].ia3_l.flatten()
        for layer in layers[1:]:
            scale = scale * layer.ia3_l.flatten()
        return self.scaled_forward(x, scale)

    def scaled_forward(self, x: Tensor, scale: Tensor | None) -> Tensor:
        """The base's forward with ``scale`` (flat) on its output (or, feed-forward, its input);
        None: the base alone."""
        raise NotImplementedError

    # -- merge ----------------------------------------------------------------------------------

    def weight_view(self) -> Tensor:
        return self.weight

    @torch.no_grad()
    def _fold(self, inverse: bool) -> None:
        weight = self.weight_view()
        new_weight, new_bias = ia3_merge(
            weight,
            self.bias,
            self.ia3_l,
            self.feedforward,
            groups=self.groups,
            inverse=inverse,
        )  # raises before anything is written
        weight.copy_(new_weight.to(weight.dtype))
        if self.bias is not None and not self.feedforward:
            self.bias.copy_(new_bias.to(self.bias.dtype))

    def merge(self) -> None:
        """Fold the vector into the weight (and bias): the forward is then the plain layer."""
        if not self.merged:
            self._fold(inverse=False)
            self.merged = True

    def unmerge(self) -> None:
        """Undo ``merge()`` (exact up to the rounding of W's dtype); refused if ``l`` has a 0."""
        if self.merged:
            self._fold(inverse=True)
            self.merged = False


class IA3Linear(_IA3Layer):
    """(IA)³ around a frozen ``nn.Linear`` or ``Conv1D``: ``y = (x Wᵀ + b) ⊙ l`` (``l`` (out, 1)),
    or with ``feedforward`` ``y = (x ⊙ l) Wᵀ + b`` (``l`` (1, in)). ``Conv1D`` stores W as
    (in, out); the op gets a transposed view."""

    adapts_kinds = ("nn.Linear", "Conv1D")

    @classmethod
    def adapts(cls, module: nn.Module) -> bool:
        return is_linear_like(module) and quantized_reason(module) is None

    @classmethod
    def vector_shape(cls, module: nn.Module, feedforward: bool) -> tuple[int, ...]:
        out_features, in_features = module.weight.shape
        if is_conv1d(module):
            out_features, in_features = in_features, out_features
        return (1, in_features) if feedforward else (out_features, 1)

    def weight_view(self) -> Tensor:
        """W as (out, in): the weight itself, or a transposed view for ``Conv1D``."""
        return self.weight.T if self.fan_in_fan_out else self.weight

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out)."""
        if self.router is not None:  # several adapters active here, or a mixed batch
            return self.router(self, x)
        # weight_view() written out (one Python call less per forward); detach(): frozen
        # (FSDP1 hands a view that requires grad)
        weight = (self.weight.T if self.fan_in_fan_out else self.weight).detach()
        if self.disabled or self.merged:
            return F.linear(x, weight, self.bias)
        return ia3_linear(x, weight, self.bias, self.ia3_l.flatten(), self.feedforward)

    def scaled_forward(self, x: Tensor, scale: Tensor | None) -> Tensor:
        weight = self.weight_view().detach()
        if scale is None:
            return F.linear(x, weight, self.bias)
        return ia3_linear(x, weight, self.bias, scale, self.feedforward)

    def describe(self) -> tuple[str, str, int]:
        out_features, in_features = self.weight_view().shape
        side = "input" if self.feedforward else "output"
        return f"IA3 ({side})", f"{in_features}->{out_features}", 1


class IA3Conv(_IA3Layer):
    """(IA)³ around a frozen ``nn.Conv2d`` / ``nn.Conv3d``: the output channels scaled, or with
    ``feedforward`` the input channels; ``l`` (1, C, 1, 1[, 1]) as peft keeps it. Grouped
    convolutions merge group by group."""

    adapts_kinds = ("nn.Conv2d", "nn.Conv3d")

    @classmethod
    def adapts(cls, module: nn.Module) -> bool:
        return isinstance(module, (nn.Conv2d, nn.Conv3d)) and quantized_reason(module) is None

    @classmethod
    def vector_shape(cls, module: nn.Module, feedforward: bool) -> tuple[int, ...]:
        channels = module.in_channels if feedforward else module.out_channels
        return (1, channels) + (1,) * (module.weight.dim() - 2)

    @property
    def groups(self) -> int:
        return self.base_module.groups

    def forward(self, x: Tensor) -> Tensor:
        """x (N, C_in, *spatial) or unbatched (C_in, *spatial) -> (N, C_out, *spatial')."""
        if self.router is not None:  # several adapters active here, or a mixed batch
            return self.router(self, x)
        conv = self.base_module._conv_forward
        if self.disabled or self.merged:
            return conv(x, self.weight.detach(), self.bias)
        return self.scaled_forward(x, self.ia3_l.flatten())

    def scaled_forward(self, x: Tensor, scale: Tensor | None) -> Tensor:
        conv = self.base_module._conv_forward
        weight = self.weight.detach()
        if scale is None:
            return conv(x, weight, self.bias)
        channel_dim = -(self.weight.dim() - 1)  # channels come before the spatial dims
        if self.feedforward:
            return conv(ia3_scale(x, scale, channel_dim), weight, self.bias)
        return ia3_scale(conv(x, weight, self.bias), scale, channel_dim)

    def describe(self) -> tuple[str, str, int]:
        side = "input" if self.feedforward else "output"
        kernel = "x".join(str(k) for k in self.weight.shape[2:])
        base = self.base_module
        return f"IA3 ({side})", f"{base.in_channels}->{base.out_channels} k{kernel}", 1


def exact_names(names: list[str], others: list[str], matches) -> list[str] | str:
    """``names`` as a list that selects exactly them among ``names + others`` under peft's rule
    ``matches(list, name)``, or, where the list would select another name too (``fc`` is a
    suffix of ``block.fc``), a regex that full-matches exactly them."""
    listed = sorted(names)
    chosen = set(names)
    if all(matches(listed, n) == (n in chosen) for n in [*names, *others]):
        return listed
    return "|".join(re.escape(n) for n in listed)


def write_ia3_config(model: nn.Module, config: IA3Config, targets: list[str]) -> dict:
    """peft's ``adapter_config.json`` for ``config``: the exact modules adapted and the exact
    feed-forward ones, so that peft adapts the same modules the same way."""

    others = [n for n, _ in model.named_modules() if n and n not in targets]
    feedforward = [t for t in targets if config.is_feedforward(t)]
    return {
        "peft_type": "IA3",
        "task_type": config.task_type,
        "target_modules": exact_names(targets, others, name_matches),
        "exclude_modules": None,
        # never None: peft would fill None from its per-architecture table
        "feedforward_modules": exact_names(
            feedforward, [t for t in targets if t not in feedforward], feedforward_match
        ),
        "modules_to_save": config.modules_to_save,
        "init_ia3_weights": config.init_ia3_weights,
        "fan_in_fan_out": any(is_conv1d(model.get_submodule(t)) for t in targets),
        "inference_mode": True,
        "base_model_name_or_path": base_model_name(model),
    }


def read_ia3_config(data: dict, path: Path) -> IA3Config:
    """An ``IA3Config`` from peft's ``adapter_config.json`` content, or a ``ValueError`` naming
    ``path`` and the field that cannot be loaded."""
    data = {key: value for key, value in data.items() if value is not None}
    # modules_to_save: the task heads peft may write twice become one set in the config
    return config_from_file(IA3Config, data, path)


IA3 = Method(
    name="ia3",
    peft_type="IA3",
    config_cls=IA3Config,
    layers=(IA3Linear, IA3Conv),
    write_config=write_ia3_config,
    read_config=read_ia3_config,
    label="IA³",
    scope_note=" only",
    command_line=COMMAND_LINE,
)
