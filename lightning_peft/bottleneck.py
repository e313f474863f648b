"""Bottleneck adapters (Houlsby et al. 2019, https://arxiv.org/abs/1902.00751).

``h ← h + s·up(act(down(dropout(h))))`` on a target module's output ``h``; ``up`` starts at
zero, so the adapted model starts exactly equal to the base. The adapter is attached as a child
``bottleneck_adapter`` of the target plus a forward hook, so the base's own parameter names
(and state-dict keys) do not change.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}
CHILD_NAME = "bottleneck_adapter"


class BottleneckAdapter(nn.Module):
    """``h + scaling · up(act(down(dropout(h))))`` for h (..., features).

    ``down``: features -> bottleneck_dim, ``up``: bottleneck_dim -> features (zero at init).
    """

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
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def _apply(self, fn, recurse=True):
        from lightning_peft.lora_layer import keep_adapter_dtype

        names = [n for n, _ in self.named_parameters()]
        return keep_adapter_dtype(self, names, fn, recurse)

    def forward(self, h: Tensor) -> Tensor:
        if self.disabled:
            return h
        update = self.up(self.activation(self.down(self.dropout(h.to(self.down.weight.dtype)))))
        return h + self.scaling * update.to(h.dtype)


def _apply_bottleneck(module: nn.Module, args, output):
    """Forward hook: run the target's output (or its first element) through its adapter."""
    adapter = getattr(module, CHILD_NAME)
    if isinstance(output, tuple):
        return (adapter(output[0]), *output[1:])
    return adapter(output)


def output_features(module: nn.Module) -> int:
    """The size of ``module``'s output: ``out_features``/``nf``, else its last Linear's."""
    for attr in ("out_features", "nf"):
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            f"cannot tell the output size of {type(module).__name__}: it has no out_features and "
            "no nn.Linear inside; target a module whose output size is known"
        )
    return linears[-1].out_features


def attach_bottleneck(module: nn.Module, adapter: BottleneckAdapter) -> None:
    """Make ``adapter`` a child of ``module`` and run ``module``'s output through it."""
    module.add_module(CHILD_NAME, adapter)
    module.register_forward_hook(_apply_bottleneck)


def detach_bottleneck(module: nn.Module) -> BottleneckAdapter:
    """Undo ``attach_bottleneck``; returns the adapter."""
    for key, hook in list(module._forward_hooks.items()):
        if hook is _apply_bottleneck:
            del module._forward_hooks[key]
    adapter = getattr(module, CHILD_NAME)
    delattr(module, CHILD_NAME)
    return adapter
