"""Several named adapters trained in one run (``PEFTCallback(adapters={...})``).

Every adapter is injected under its name and made active (all train); each batch says which
adapter each row runs in the batch field ``adapter_names`` (``BATCH_FIELD``: a list of str, one
per row; ``"__base__"`` for a row without adapter). The callback removes the field from the
batch before ``training_step`` / ``validation_step`` sees it and runs the step inside
``mixed_batch``: each adapter receives gradient from its own rows only. Checkpoints hold every
adapter's tensors and each adapter's config; the PEFT directory written at the end holds each
adapter in peft's layout (``default`` at the directory, the others at ``<directory>/<name>``).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any

from torch import nn

from lightning_peft.core.adapter import AdapterConfigLike
from lightning_peft.core.errors import InputError
from lightning_peft.lightning.checkpoints import CheckpointContents, config_differences
from lightning_peft.methods.registry import method_for
from lightning_peft.model.injection import InjectionReport, find_adapters, inject_adapters
from lightning_peft.model.mixed import mixed_batch
from lightning_peft.model.named import set_active_adapters
from lightning_peft.model.sites import check_adapter_name

BATCH_FIELD = "adapter_names"


def checked_adapters(adapters: Mapping[str, AdapterConfigLike]) -> dict[str, AdapterConfigLike]:
    """``adapters`` as a dict, or ``ValueError``: empty, an invalid name, configs of several
    methods or, for several adapters, of a method that holds one adapter per model (bottleneck
    adapters, prompt tuning); ``TypeError`` for a config of no registered method."""
    adapters = dict(adapters)
    if not adapters:
        raise ValueError("PEFTCallback(adapters=...) needs at least one name: config")
    methods = {method_for(config).name for config in adapters.values()}
    for name in adapters:
        check_adapter_name(name)
    if len(methods) > 1:
        raise ValueError(
            f"PEFTCallback(adapters=...): the adapters share one method, got {sorted(methods)}"
        )
    method = method_for(next(iter(adapters.values())))
    if len(adapters) > 1 and not any(layer.supports_named for layer in method.layers):
        raise ValueError(f"{method.label or method.name} holds one adapter per model")
    return adapters


def inject_all(root: nn.Module, adapters: dict[str, AdapterConfigLike]) -> InjectionReport:
    """Inject every adapter under its name and make them all active (all train)."""
    report = None
    for name, config in adapters.items():
        report = inject_adapters(root, config, name=name)
    set_active_adapters(root, list(adapters))
    return report


def adopt_differences(root: nn.Module, adapters: dict[str, AdapterConfigLike]) -> list[str]:
    """How the adapters already in ``root`` differ from ``adapters`` (names, then configs)."""
    states = find_adapters(root)[2].states
    if list(states) != list(adapters):
        return [f"adapters: {list(states)!r} in the model, {list(adapters)!r} in this run"]
    differences = []
    for name, config in adapters.items():
        saved = states[name].config
        differences += [
            f"{name}: {d}"
            for d in config_differences(
                method_for(saved).name, saved.to_dict(), config, source="the model"
            )
        ]
    return differences


def saved_adapters(adapters: dict[str, AdapterConfigLike]) -> dict[str, dict]:
    """What a checkpoint records of the adapters: ``{name: config.to_dict()}``."""
    return {name: config.to_dict() for name, config in adapters.items()}


def check_adapters_config(
    contents: CheckpointContents, adapters: dict[str, AdapterConfigLike]
) -> None:
    """Raise ``InputError`` unless the checkpoint was trained with these adapters."""
    state = contents.peft_state or {}
    saved = state.get("adapters")
    where = f"ckpt_path {contents.path}"
    if saved is None or list(saved) != list(adapters):
        raise InputError(
            f"{where} was trained with other adapters: "
            f"{list(saved) if saved is not None else 'one unnamed adapter'} in the checkpoint, "
            f"{list(adapters)} in this run"
        )
    for name, config in adapters.items():
        differences = config_differences(state.get("method"), saved[name], config)
        if differences:
            raise InputError(
                f"{where} was trained with another configuration of adapter {name!r}: "
                + "; ".join(differences[:4])
            )


class BatchRouting:
    """Enters ``mixed_batch`` for one step from the batch's ``adapter_names`` field (removed
    from the batch), and leaves it after the step."""

    def __init__(self) -> None:
        self._open: AbstractContextManager | None = None

    def enter(self, root: nn.Module, batch: Any, adapters: dict) -> None:
        names = batch.pop(BATCH_FIELD, None) if isinstance(batch, dict) else None
        if names is None:
            raise InputError(
                f"PEFTCallback(adapters={list(adapters)}): each batch must be a dict with the "
                f"field {BATCH_FIELD!r} (one adapter name per row, '__base__' for none)"
            )
        self.exit()
        context = mixed_batch(root, list(names))
        try:
            context.__enter__()
        except ValueError as error:
            raise InputError(f"PEFTCallback: batch field {BATCH_FIELD!r}: {error}") from error
        self._open = context

    def exit(self) -> None:
        context, self._open = self._open, None
        if context is not None:
            context.__exit__(None, None, None)
