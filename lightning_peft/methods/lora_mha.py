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

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_peft.config import REWRITES_BASE, LoRAConfig
from lightning_peft.methods.base import AdapterLayer
from lightning_peft.methods.lora_common import config_rank


class LoRAMultiheadAttention(AdapterLayer):
    """LoRA around a frozen ``nn.MultiheadAttention`` (packed q/k/v projection).

    ``in_proj_weight ← W_in + s·B A`` (A (r, E), B (3E, r)) and ``out_proj.weight ← W_out +
    s·B_o A_o`` (A_o (r, E), B_o (E, r)), inside each forward; ``merge()`` makes it permanent.

    Args:
        base: the attention module (its parameters are shared, not copied; its ``out_proj``
            stays a child, so the frozen state-dict keys do not change).
        r, lora_alpha, use_rslora, init_lora_weights, adapter_dtype: as in ``LoRAConfig``.
    """

    mergeable = True
    saved_names: ClassVar[dict[str, str]] = {
        "lora_A": "lora_A.weight",
        "lora_B": "lora_B.weight",
        "out_lora_A": "base_layer.out_proj.lora_A.weight",
        "out_lora_B": "base_layer.out_proj.lora_B.weight",
    }
    fast_names = ("lora_B", "out_lora_B")

    def __init__(
        self,
        base: nn.MultiheadAttention,
        r: int,
        lora_alpha: float,
        *,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        adapter_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        reason = _unsupported(base)
        if reason is not None:
            raise TypeError(f"LoRAMultiheadAttention cannot adapt this module: {reason}")
        if r < 1:
            raise ValueError(f"rank r must be >= 1, got {r}")
        for name, param in base._parameters.items():  # the same objects, not copies
            self.register_parameter(name, param)
        self.out_proj = base.out_proj  # a child here too: keys stay ``<p>.out_proj.weight``
        for param in base.parameters():
            param.requires_grad_(False)
        object.__setattr__(self, "base_module", base)  # what unwrap() puts back; not a child
        self.r, self.lora_alpha, self.use_rslora = r, lora_alpha, use_rslora
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        embed_dim = base.embed_dim
        for name, shape in self.shapes(embed_dim, r).items():
            factory = {"device": base.in_proj_weight.device, "dtype": adapter_dtype}
            setattr(self, name, nn.Parameter(torch.empty(shape, **factory)))
        self.merged = False
        self.disabled = False
        self.reset_adapter_parameters(init_lora_weights)
        self.train(base.training)

    @staticmethod
    def shapes(embed_dim: int, rank: int) -> dict[str, tuple[int, int]]:
        return {
            "lora_A": (rank, embed_dim),
            "lora_B": (3 * embed_dim, rank),
            "out_lora_A": (rank, embed_dim),
            "out_lora_B": (embed_dim, rank),
        }

    # -- the protocol, class level --------------------------------------------------------------

    @classmethod
    def adapts(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.MultiheadAttention)

    @classmethod
    def check(cls, module: nn.Module, config: LoRAConfig, name: str) -> None:
        config_rank(config, name)  # a valid rank
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

    @classmethod
    def adapter_shapes(cls, module: nn.Module, config: LoRAConfig, name: str) -> dict:
        rank, _ = config.rank_and_alpha(name)
        return cls.shapes(module.embed_dim, rank)

    @classmethod
    def build(cls, module: nn.Module, config: LoRAConfig, name: str) -> LoRAMultiheadAttention:
        rank, alpha = config.rank_and_alpha(name)
        return cls(
            module,
            rank,
            alpha,
            use_rslora=config.use_rslora,
            init_lora_weights=config.init_lora_weights,
            adapter_dtype=getattr(torch, config.adapter_dtype),
        )

    # -- the protocol, instance -----------------------------------------------------------------

    def adapter_parameter_names(self) -> list[str]:
        return list(self.saved_names)

    @property
    def base_layer(self) -> nn.Module:
        return self.base_module

    def unwrap(self) -> nn.Module:
        base = self.base_module
        for name in base._parameters:
            setattr(base, name, getattr(self, name))
        base.out_proj = self.out_proj
        return base

    def describe(self) -> tuple[str, str, int]:
        embed_dim = self.base_module.embed_dim
        return "LoRA", f"{embed_dim}->{embed_dim} attention in/out", self.r

    @torch.no_grad()
    def reset_adapter_parameters(self, init_lora_weights: bool | str = True) -> None:
        """As peft's linear layers: A kaiming-uniform (``"gaussian"``: N(0, 1/r)), B = 0;
        ``False``: both random."""
        for a, b in (("lora_A", "lora_B"), ("out_lora_A", "out_lora_B")):
            lora_A, lora_B = self.get_parameter(a), self.get_parameter(b)
            if init_lora_weights == "gaussian":
                nn.init.normal_(lora_A, std=1 / self.r)
            else:
                nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
            if init_lora_weights is False:
                nn.init.kaiming_uniform_(lora_B, a=math.sqrt(5))
            else:
                nn.init.zeros_(lora_B)

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
