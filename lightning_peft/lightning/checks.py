"""What the callback checks while training: which tensors train, their gradients, and whether
the loss, the gradients and the adapters are finite."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_peft.core.distributed import clean_name
from lightning_peft.core.errors import DivergenceError, InputError
from lightning_peft.core.finite import (
    describe_non_finite,
    last_finite_checkpoint,
    local,
    maybe_non_finite,
    non_finite_tensors,
)
from lightning_peft.lightning.checkpoints import checkpoint_paths
from lightning_peft.model.helpers import active_state_dict
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
    return dict(sorted({**trainable, **active_state_dict(pl_module)}.items()))


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
    for key in active_state_dict(pl_module):
        owner = max((m for m in modules if key.startswith(f"{m}.")), key=len, default=None)
        own_weight = owner is not None and key[len(owner) + 1 :] in ("weight", "bias")
        if owner is not None and not own_weight and key in parameters:
            groups[owner].append(parameters[key])
    return {name: params for name, params in groups.items() if params}


def warn_non_finite(pl_module: nn.Module, state: Mapping[str, Tensor]) -> None:
    """``check_finite=False``: the adapter is written as it is, but not silently."""
    keys = active_state_dict(pl_module)  # keyed as pl_module.state_dict(), as state is
    bad = non_finite_tensors({k: state[k] for k in keys if k in state})
    if bad:
        rank_zero_warn(
            "PEFTCallback(check_finite=False): "
            + describe_non_finite(bad, len(keys), "value")
            + "; the adapter is written as it is"
        )


def enabled_scaler(trainer: pl.Trainer) -> Any:
    """The precision plugin's ``GradScaler`` when it is enabled (``16-mixed``), else None."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def scaler_found_inf(scaler: Any, optimizer: torch.optim.Optimizer) -> Tensor | None:
    """Whether ``scaler`` (``enabled_scaler``) found inf/NaN when it unscaled this optimizer's
    gradients (Lightning unscales before ``on_before_optimizer_step``), as a tensor; None without
    a scaler or before it unscaled (optimizers that unscale in step())."""
    if scaler is None:
        return None
    state = getattr(scaler, "_per_optimizer_states", {}).get(id(optimizer), {})
    found = state.get("found_inf_per_device") or {}
    if not found:
        return None
    return sum(v.to(next(iter(found.values())).device) for v in found.values())


class FiniteCheck:
    """The finite check of one run: the losses backpropagated since the last optimizer step and
    the trained parameters (read once the strategy has wrapped the model), checked together
    before each step with one fused reduction and one host synchronisation."""

    def __init__(self) -> None:
        self.losses: list[Tensor] = []  # of the backward passes since the last optimizer step
        self.trained: list[tuple[str, nn.Parameter]] | None = None
        self.batch_idx: int | None = None

    def add_loss(self, loss: Tensor) -> None:
        self.losses.append(loss.detach())  # the loss as backpropagated (scaled under AMP)

    def check(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        with_gradients: bool,
        save_adapter_to: object = None,
    ) -> None:
        """One fused reduction over the losses since the last step and the trained gradients,
        one host synchronisation; raise ``DivergenceError`` at a non-finite value, unless a
        gradient scaler skips this step."""
        if self.trained is None:  # after the strategy wrapped the model: the live parameters
            self.trained = [
                (clean_name(n), p) for n, p in pl_module.named_parameters() if p.requires_grad
            ]
        losses, self.losses = self.losses, []
        grads = []
        if with_gradients:
            grads = [local(p.grad) for _, p in self.trained if p.grad is not None]
        if not grads and not losses:
            return
        device = (grads or losses)[0].device
        scaler = enabled_scaler(trainer)
        found_inf = scaler_found_inf(scaler, optimizer)
        flags = torch.stack(
            [
                maybe_non_finite(grads).any().to(device),
                maybe_non_finite(losses).any().to(device),
                (found_inf if found_inf is not None else torch.zeros(())).to(device) > 0,
            ]
        )
        if trainer.world_size > 1:  # sharded gradients, per-process losses: decide together
            flags = trainer.strategy.reduce(flags.float(), reduce_op="sum") > 0
        bad_grads, bad_loss, scaler_skips = flags.tolist()  # the one host synchronisation
        if not (bad_grads or bad_loss):
            return
        if scaler is not None:
            # The scaler tests every gradient after unscaling (or in step() for optimizers that
            # unscale themselves) and skips the step: not a divergence.
            if scaler_skips or (found_inf is None and bad_grads):
                return
        # Rare from here on: which tensors, exactly (an overflowed norm of finite values is not
        # a NaN); every process gets here together (the flags were reduced).
        found = self.non_finite_gradients(trainer, with_gradients)
        if found or bad_loss:
            raise DivergenceError(self.message(trainer, losses, found, save_adapter_to))

    def non_finite_gradients(
        self, trainer: pl.Trainer, with_gradients: bool
    ) -> list[tuple[str, int, int]]:
        """The trained tensors whose gradient holds NaN or infinity (on any process: the first
        process that has one names its first)."""
        grads = {n: p.grad for n, p in self.trained if p.grad is not None and with_gradients}
        found = non_finite_tensors(grads)
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, found)
            found = next((f for f in gathered if f), [])
        return found

    def message(
        self,
        trainer: pl.Trainer,
        losses: list[Tensor],
        found: list[tuple[str, int, int]],
        save_adapter_to: object = None,
    ) -> str:
        """What went non-finite where, and what is left: one line (every process builds it)."""
        loss_values = torch.stack(losses).float().tolist() if losses else []
        bad_losses = [v for v in loss_values if not math.isfinite(v)]
        parts = []
        if bad_losses:
            parts.append(f"the loss is {bad_losses[0]}")
        elif loss_values:
            parts.append(f"the loss is finite ({loss_values[-1]:.4g})")
        if found:
            parts.append(describe_non_finite(found, len(self.trained), "gradient"))
        elif losses:
            parts.append("the trained tensors' gradients are finite")
        where = f"step {trainer.global_step} (epoch {trainer.current_epoch}"
        where += f", batch {self.batch_idx})" if self.batch_idx is not None else ")"
        saved = f"; nothing was written to {save_adapter_to}" if save_adapter_to is not None else ""
        checkpoint = last_finite_checkpoint(checkpoint_paths(trainer))
        return (
            f"PEFTCallback: training diverged at {where}: {' and '.join(parts)}. The adapters "
            f"were not updated with this step{saved}; {checkpoint}. Lower the learning rate or "
            "clip the gradients (check_finite=False, or --check_finite false, turns this check off)"
        )


def check_gradients(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Name the adapters that received no gradient in this first step (summed over the
    processes); raise if none did."""
    groups = adapter_parameters_by_module(pl_module)
    if not groups:
        return
    acted = torch.tensor(
        [float(any(p.grad is not None for p in params)) for params in groups.values()],
        device=pl_module.device,
    )
    acted = trainer.strategy.reduce(acted, reduce_op="sum")  # every rank calls this hook
    idle = [name for name, count in zip(groups, acted.tolist(), strict=True) if count == 0]
    if not idle:
        return
    names = ", ".join(idle[:5]) + (", ..." if len(idle) > 5 else "")
    if len(idle) == len(groups):
        raise InputError(
            f"PEFTCallback: none of the {len(groups)} adapters received a gradient in the "
            f"first step ({names}): the forward pass never calls these modules (it may read "
            "their weights directly, as nn.MultiheadAttention does with out_proj, or a hub "
            "kernel may have replaced a parent module's forward); choose other target_modules"
        )
    rank_zero_warn(
        f"PEFTCallback: {len(idle)} of the {len(groups)} adapters received no gradient in the "
        f"first step: {names}. Fine if those modules were merely unused by this batch (e.g. "
        "experts no token reached); if their forward is bypassed (a hub kernel replacing a "
        "parent module's forward, say) they never train (and DDP needs "
        "find_unused_parameters=True)"
    )
