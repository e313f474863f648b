"""What the callback checks while training: which tensors train, their gradients, and whether
the loss, the gradients and the adapters are finite."""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_peft.core.distributed import clean_name
from lightning_peft.core.finite import (
    describe_non_finite,
    non_finite_tensors,
)
from lightning_peft.model.helpers import adapter_state_dict
from lightning_peft.model.injection import find_injection, injection_report


def trained_tensors(pl_module: nn.Module) -> dict[str, Tensor]:
    """``{state_dict key: tensor}`` of what the callback checkpoints: the adapters (with
    ``modules_to_save`` and trained biases) and any other trainable parameter, e.g. a task head
    the LightningModule holds outside the adapted model."""
    trainable = {
        clean_name(n): p  # FSDP1 wrappers rename parameters, not state dict keys
        for n, p in pl_module.named_parameters(remove_duplicate=False)
        if p.requires_grad
    }
    return dict(sorted({**trainable, **adapter_state_dict(pl_module)}.items()))


def adapter_parameters_by_module(pl_module: nn.Module) -> dict[str, list[nn.Parameter]]:
    """``{adapted module name: its adapter parameters}`` (names as in ``pl_module``), leaving
    out the module's own weight and bias."""
    found = find_injection(pl_module)
    if found is None:
        return {}
    prefix = f"{found[0]}." if found[0] else ""
    modules = [prefix + m.name for m in injection_report(pl_module).modules]
    parameters = {clean_name(n): p for n, p in pl_module.named_parameters(remove_duplicate=False)}
    groups: dict[str, list[nn.Parameter]] = {name: [] for name in modules}
    for key in adapter_state_dict(pl_module):
        owner = max((m for m in modules if key.startswith(f"{m}.")), key=len, default=None)
        own_weight = owner is not None and key[len(owner) + 1 :] in ("weight", "bias")
        if owner is not None and not own_weight and key in parameters:
            groups[owner].append(parameters[key])
    return {name: params for name, params in groups.items() if params}


def warn_non_finite(pl_module: nn.Module, state: Mapping[str, Tensor]) -> None:
    """``check_finite=False``: the adapter is written as it is, but not silently."""
    keys = adapter_state_dict(pl_module)  # keyed as pl_module.state_dict(), as state is
    bad = non_finite_tensors({k: state[k] for k in keys if k in state})
    if bad:
        rank_zero_warn(
            "PEFTCallback(check_finite=False): "
            + describe_non_finite(bad, len(keys), "value")
            + "; the adapter is written as it is"
        )


def scaler_found_inf(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> Tensor | None:
    """Whether the precision plugin's ``GradScaler`` found inf/NaN when it unscaled this
    optimizer's gradients (Lightning unscales before ``on_before_optimizer_step``), as a tensor;
    None without an enabled scaler or before it unscaled (optimizers that unscale in step())."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    state = getattr(scaler, "_per_optimizer_states", {}).get(id(optimizer), {})
    found = state.get("found_inf_per_device") or {}
    if not found:
        return None
    return sum(v.to(next(iter(found.values())).device) for v in found.values())
