"""Bottleneck adapters (Houlsby et al. 2019, https://arxiv.org/abs/1902.00751).

``h ← h + s·up(act(down(dropout(h))))`` on a target module's output ``h``; ``up`` starts at
zero, so the adapted model starts exactly equal to the base. The adapter is attached as a child
``bottleneck_adapter`` of the target plus a forward hook, so the base's own parameter names
(and state-dict keys) do not change. They have no peft counterpart: they are saved in peft's
layout with ``"peft_type": "LIGHTNING_BOTTLENECK"``, which only this package reads.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_peft.core.adapter import AdapterLayer, ChildHook, Method
from lightning_peft.methods.bottleneck.cli import COMMAND_LINE
from lightning_peft.methods.bottleneck.config import AdapterConfig

ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}
CHILD_NAME = "bottleneck_adapter"
BOTTLENECK_TYPE = "LIGHTNING_BOTTLENECK"


def _apply_bottleneck(module: nn.Module, args, output):
    """Forward hook: run the target's output (or its first element) through its adapter."""
    adapter = getattr(module, CHILD_NAME)
    if isinstance(output, tuple):
        return (adapter(output[0]), *output[1:])
    return adapter(output)


def output_features(module: nn.Module) -> int | None:
    """The size of ``module``'s output: ``out_features``/``nf``, else its last Linear's, else
    None (unknown)."""
    for attr in ("out_features", "nf"):
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


class BottleneckAdapter(AdapterLayer):
    """``h + scaling · up(act(down(dropout(h))))`` for h (..., features).

    ``down``: features -> bottleneck_dim, ``up``: bottleneck_dim -> features (zero at init).
    """

    placement = ChildHook(CHILD_NAME, _apply_bottleneck)
    mergeable = False

    def __init__(
        self,
        features: int,
        bottleneck_dim: int,
        *,
        activation: str = "relu",
        dropout: float = 0.0,
        scaling: float = 1.0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        self.down = nn.Linear(features, bottleneck_dim, dtype=dtype, device=device)
        self.up = nn.Linear(bottleneck_dim, features, dtype=dtype, device=device)
        self.activation = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)
        self.scaling = scaling
        self.disabled = False
        self.merged = False
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    # -- the protocol, class level --------------------------------------------------------------

    @classmethod
    def adapts(cls, module: nn.Module) -> bool:
        return output_features(module) is not None

    @classmethod
    def adapter_shapes(cls, module: nn.Module, config: AdapterConfig, name: str) -> dict:
        features, hidden = output_features(module), config.bottleneck_dim
        return {
            "down.weight": (hidden, features),
            "down.bias": (hidden,),
            "up.weight": (features, hidden),
            "up.bias": (features,),
        }

    @classmethod
    def build(cls, module: nn.Module, config: AdapterConfig, name: str) -> BottleneckAdapter:
        adapter = cls(
            output_features(module),
            config.bottleneck_dim,
            activation=config.activation,
            dropout=config.dropout,
            scaling=config.scaling,
            dtype=getattr(torch, config.adapter_dtype),
            device=next((p.device for p in module.parameters()), None),
        )
        object.__setattr__(adapter, "target_module", module)  # not a child: no cycle
        return adapter

    # -- the protocol, instance -----------------------------------------------------------------

    def adapter_parameter_names(self) -> list[str]:
        return ["down.weight", "down.bias", "up.weight", "up.bias"]

    @property
    def base_layer(self) -> nn.Module:
        return self.__dict__.get("target_module")

    def describe(self) -> tuple[str, str, int]:
        hidden = self.down.out_features
        return "Adapter", f"{self.down.in_features}->{hidden}->{self.up.out_features}", hidden

    def forward(self, h: Tensor) -> Tensor:
        if self.disabled:
            return h
        update = self.up(self.activation(self.down(self.dropout(h.to(self.down.weight.dtype)))))
        return h + self.scaling * update.to(h.dtype)


def attach_bottleneck(module: nn.Module, adapter: BottleneckAdapter) -> None:
    """Make ``adapter`` a child of ``module`` and run ``module``'s output through it."""
    BottleneckAdapter.placement.attach(module, "", adapter)


def detach_bottleneck(module: nn.Module) -> BottleneckAdapter:
    """Undo ``attach_bottleneck``; returns the adapter."""
    adapter = getattr(module, CHILD_NAME)
    BottleneckAdapter.placement.detach(module, CHILD_NAME, adapter)
    return adapter


def write_bottleneck_config(model: nn.Module, config: AdapterConfig, targets: list[str]) -> dict:
    return {"peft_type": BOTTLENECK_TYPE, **config.to_dict(), "target_modules": targets}


def read_bottleneck_config(data: dict, path: Path) -> AdapterConfig:
    names = {f.name for f in fields(AdapterConfig)}
    unknown = sorted(set(data) - names - {"peft_type"})
    if unknown:
        raise ValueError(f"{path}: unknown field {unknown[0]!r} for {BOTTLENECK_TYPE}")
    try:
        return AdapterConfig(**{k: v for k, v in data.items() if k in names})
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None


BOTTLENECK = Method(
    name="adapter",
    peft_type=BOTTLENECK_TYPE,
    config_cls=AdapterConfig,
    layers=(BottleneckAdapter,),
    write_config=write_bottleneck_config,
    read_config=read_bottleneck_config,
    scope_text="a bottleneck adapter needs a module whose output size is known (out_features, nf, "
    "or an nn.Linear inside)",
    command_line=COMMAND_LINE,
)
