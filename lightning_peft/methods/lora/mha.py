"""LoRA on ``nn.MultiheadAttention``, as peft's ``lora.MultiheadAttention``: one low-rank update
of the packed input projection ``in_proj_weight`` (3E, E) and one of ``out_proj`` (E, E).

``nn.MultiheadAttention`` never calls a projection module (it reads ``in_proj_weight`` and
``out_proj.weight`` directly), so the adapter cannot sit on a projection: the layer runs the
attention module's own forward with ``W_in + s·B A`` and ``W_out + s·B_o A_o`` in place of its two
weights (``torch.func.functional_call``; peft merges them in before, and out after, each
forward). peft 0.21.2 adds out_proj's update twice there and in ``merge_and_unload``
(huggingface/peft#3774, open): an adapter with a nonzero ``B_o`` gives other outputs in peft.
Keys as peft's: ``<p>.lora_A.weight`` (r, E), ``<p>.lora_B.weight`` (3E, r),
``<p>.base_layer.out_proj.lora_A.weight`` (r, E), ``<p>.base_layer.out_proj.lora_B.weight`` (E, r).

As in peft: no DoRA, no ``lora_bias``, separate q/k/v weights (``kdim``/``vdim`` ≠ ``embed_dim``)
unsupported, and ``lora_dropout`` does not act here (the update is applied to the weights).
Refused by name as well: PiSSA/OLoRA and ``bias`` other than ``"none"`` (peft nests the
attention's biases under names this package does not write).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_peft.methods.lora.base import LoRALayer, init_factor_pair
from lightning_peft.methods.lora.config import REWRITES_BASE, LoRAConfig


class LoRAMultiheadAttention(LoRALayer):
    """LoRA around a frozen ``nn.MultiheadAttention`` (packed q/k/v projection).

    ``in_proj_weight ← W_in + s·B A`` (A (r, E), B (3E, r)) and ``out_proj.weight ← W_out +
    s·B_o A_o`` (A_o (r, E), B_o (E, r)), inside each forward; ``merge()`` makes it permanent.
    Two factor pairs on two weights: the forward, the init and merge/unmerge are this class's own.

    Args (as ``LoRALayer``): base (the attention module; its parameters are shared, not copied;
    its ``out_proj`` stays a child, so the frozen state-dict keys do not change), r, lora_alpha,
    use_rslora, init_lora_weights, adapter_dtype. ``dropout`` is not applied (the update acts on
    the weights); DoRA and ``lora_bias`` are refused.
    """

    supports_named = False  # one adapter per module (named adapters: docs/named-adapters.md)

    adapts_kinds = ("nn.MultiheadAttention",)

    saved_names: ClassVar[dict[str, str]] = {
        "lora_A": "lora_A.weight",
        "lora_B": "lora_B.weight",
        "out_lora_A": "base_layer.out_proj.lora_A.weight",
        "out_lora_B": "base_layer.out_proj.lora_B.weight",
    }
    fast_names = ("lora_B", "out_lora_B")
    factor_names = ("lora_A", "lora_B", "out_lora_A", "out_lora_B")
    supports_dora = False
    supports_lora_bias = False

    # -- declarations ---------------------------------------------------------------------------

    @classmethod
    def adapts(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.MultiheadAttention)

    @classmethod
    def base_refusal(cls, base: nn.Module) -> str | None:
        reason = _unsupported(base)
        return None if reason is None else f"{cls.__name__} cannot adapt this module: {reason}"

    @classmethod
    def factor_shapes(cls, module: nn.Module, rank: int) -> dict[str, tuple[int, int]]:
        embed_dim = module.embed_dim
        return {
            "lora_A": (rank, embed_dim),
            "lora_B": (3 * embed_dim, rank),
            "out_lora_A": (rank, embed_dim),
            "out_lora_B": (embed_dim, rank),
        }

    @classmethod
    def check_module(cls, module: nn.Module, config: LoRAConfig, name: str, rank: int) -> None:
        label = f"{name!r} (a {type(module).__name__})"
        reason = _unsupported(module)
        if reason is not None:
            raise ValueError(f"{label}: {reason}")
        refusals = [
            (config.use_dora, "DoRA"),
            (config.lora_bias, "lora_bias"),
            (config.init_lora_weights in REWRITES_BASE, config.init_lora_weights),
        ]
        for refused, shown in refusals:
            if refused:
                raise ValueError(
                    f"{shown} is not supported on nn.MultiheadAttention ({label}), as in peft: "
                    "exclude the module or leave the option at its default"
                )
        if config.bias != "none":
            raise ValueError(
                f"bias={config.bias!r} with an nn.MultiheadAttention target ({label}) is not "
                "supported: peft saves the attention's biases under nested names this package "
                "does not write; use bias='none' or exclude the module"
            )

    # -- the protocol, instance -----------------------------------------------------------------

    def share_base(self, base: nn.Module) -> None:
        for name, param in base._parameters.items():  # the same objects, not copies
            self.register_parameter(name, param)
        self.out_proj = base.out_proj  # a child here too: keys stay ``<p>.out_proj.weight``
        for param in base.parameters():
            param.requires_grad_(False)

    def unwrap(self) -> nn.Module:
        base = super().unwrap()
        base.out_proj = self.out_proj
        return base

    def describe(self) -> tuple[str, str, int]:
        embed_dim = self.base_module.embed_dim
        return "LoRA", f"{embed_dim}->{embed_dim} attention in/out", self.r

    def init_factors(self, init_lora_weights: bool | str) -> None:
        """Both pairs as peft's linear layers (``init_factor_pair``)."""
        super().init_factors(init_lora_weights)  # the in-projection pair, refusals
        init_factor_pair(self.out_lora_A, self.out_lora_B, init_lora_weights, self.r)

    # -- forward --------------------------------------------------------------------------------

    def deltas(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(s·B A (3E, E), s·B_o A_o (E, E))`` in ``dtype``, differentiable."""
        in_delta = self.lora_B.to(dtype) @ self.lora_A.to(dtype)
        out_delta = self.out_lora_B.to(dtype) @ self.out_lora_A.to(dtype)
        return in_delta * self.scaling, out_delta * self.scaling

    def forward(self, query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any):
        """``nn.MultiheadAttention.forward`` with the adapted projection weights."""
        weights = {n: p for n, p in self._parameters.items() if p is not None}
        weights.update({f"out_proj.{n}": p for n, p in self.out_proj._parameters.items()})
        if not (self.disabled or self.merged):
            in_weight, out_weight = self.in_proj_weight, self.out_proj.weight
            in_delta, out_delta = self.deltas(in_weight.dtype)
            weights["in_proj_weight"] = in_weight.detach() + in_delta
            weights["out_proj.weight"] = out_weight.detach() + out_delta
        for name in self.adapter_parameter_names():
            del weights[name]
        return functional_call(self.base_module, weights, (query, key, value, *args), kwargs)

    # -- merge ----------------------------------------------------------------------------------

    @torch.no_grad()
    def _add_deltas(self, sign: float) -> None:
        for weight, delta in zip(
            (self.in_proj_weight, self.out_proj.weight),
            self.deltas(torch.promote_types(self.lora_A.dtype, torch.float32)),
            strict=True,
        ):
            wide = weight.to(torch.promote_types(weight.dtype, torch.float32))
            weight.copy_(wide + sign * delta)

    def merge(self) -> None:
        """Fold both updates into the weights (``W ← W + s·B A``)."""
        if not self.merged:
            self._add_deltas(1.0)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._add_deltas(-1.0)
            self.merged = False


def _unsupported(module: nn.Module) -> str | None:
    if not getattr(module, "_qkv_same_embed_dim", False):
        return (
            "its query, key and value have different sizes (kdim/vdim), so it holds separate "
            "q/k/v weights; peft's LoRA supports only the packed in_proj_weight"
        )
    if not isinstance(module.out_proj, nn.Linear):
        return f"its out_proj is a {type(module.out_proj).__name__}, not an nn.Linear"
    return None
