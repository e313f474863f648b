"""``PEFTCallback``: adapters for any LightningModule, with adapter-only checkpoints.

Lightning's hook order in ``fit`` is ``Callback.setup`` -> ``LightningModule.setup`` ->
``configure_model`` -> checkpoint restore -> the strategy wraps the model -> optimizers. The
callback injects in ``setup`` when the target layers already exist, else right after the
user's ``configure_model`` (the pattern for large and FSDP2 models), always before a
checkpoint is restored, the model is wrapped or the optimizer is built; never twice.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from typing_extensions import override

from lightning_peft.config import AdapterConfig, LoRAConfig
from lightning_peft.distributed import (
    clean_name,
    fsdp2_shard,
    full_state_dict,
    is_sharded_strategy,
)
from lightning_peft.hf_format import save_adapter
from lightning_peft.injection import find_injection, inject_adapters, injection_report
from lightning_peft.methods import method_for
from lightning_peft.methods.ia3 import IA3Config
from lightning_peft.methods.prompt_tuning import PromptTuningConfig
from lightning_peft.model_helpers import adapter_state_dict, merge_adapters
from lightning_peft.targeting import select_targets


class PEFTCallback(Callback):
    """Fine-tune any LightningModule with LoRA, DoRA, bottleneck adapters, IA³ or prompt tuning.

    The base model is frozen, only adapters (plus ``modules_to_save`` and chosen biases) train,
    checkpoints hold only those tensors, and resuming with ``trainer.fit(..., ckpt_path=...)``
    restores them and the optimizer state (the callback sets ``strict_loading = False``).

    Args:
        config: the config of a registered method (``LoRAConfig``, ``AdapterConfig``,
            ``IA3Config``, ``PromptTuningConfig``).
        merge_on_train_end: merge LoRA/DoRA/IA³ into the base weights when training ends
            (single device and DDP; refused under sharded strategies).
        save_adapter_to: write the Hugging Face PEFT-format adapter directory here when
            training ends (rank zero; full tensors gathered under FSDP/FSDP2).
        verbose: print the table of adapted modules on rank zero.
        module: the attribute path of the submodule to adapt (e.g. ``"model"``). By default the
            single transformers model held by the LightningModule if there is one (so that saved
            adapters load into it with ``peft``), else the LightningModule itself.
        fsdp2_layer_cls: with ``ModelParallelStrategy``, the block class(es) to shard with FSDP2
            after injection (e.g. ``LlamaDecoderLayer``); the user's ``configure_model`` then only
            builds the model. Users who shard themselves call ``inject_adapters`` first.

    Example::

        config = LoRAConfig(r=16, target_modules=["q_proj", "v_proj"])
        trainer = Trainer(callbacks=[PEFTCallback(config)])
        trainer.fit(model)  # model: any LightningModule
    """

    def __init__(
        self,
        config: LoRAConfig | AdapterConfig | IA3Config | PromptTuningConfig,
        *,
        merge_on_train_end: bool = False,
        save_adapter_to: str | Path | None = None,
        verbose: bool = True,
        module: str | None = None,
        fsdp2_layer_cls: type | tuple[type, ...] | None = None,
    ) -> None:
        method = method_for(config)  # TypeError for a config of no registered method
        if merge_on_train_end and not method.mergeable:
            layer = next(cls for cls in method.layers if not cls.mergeable)
            raise ValueError(f"merge_on_train_end: {layer.__name__} adapters {layer.merge_refusal}")
        self.config = config
        self.merge_on_train_end = merge_on_train_end
        self.save_adapter_to = Path(save_adapter_to) if save_adapter_to is not None else None
        self.verbose = verbose
        self.module = module
        self.fsdp2_layer_cls = fsdp2_layer_cls
        self.report = None

    # -- injection ------------------------------------------------------------------------------

    def adapted_module(self, pl_module: pl.LightningModule) -> nn.Module:
        """The module that gets the adapters (see ``module`` in the class docstring)."""
        if self.module is not None:
            return pl_module.get_submodule(self.module)
        hf_models = [c for c in pl_module.children() if _is_transformers_model(c)]
        return hf_models[0] if len(hf_models) == 1 else pl_module

    def _inject(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if find_injection(pl_module) is None:
            root = self.adapted_module(pl_module)
            self.report = inject_adapters(root, self.config)
            if self.fsdp2_layer_cls is not None and is_sharded_strategy(trainer.strategy):
                fsdp2_shard(root, self.fsdp2_layer_cls, mesh=_data_parallel_mesh(pl_module))
        else:
            self.report = injection_report(pl_module)
        if self.verbose:
            rank_zero_info(f"PEFTCallback ({self.report.method}):\n{self.report}")

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.merge_on_train_end and is_sharded_strategy(trainer.strategy):
            raise ValueError(
                f"merge_on_train_end is not supported under {type(trainer.strategy).__name__}: "
                "the base weights are sharded. Save the adapter (save_adapter_to=...) and merge "
                "it into an unsharded model with load_adapter + merge_adapters"
            )
        pl_module.strict_loading = False  # checkpoints hold only the adapters
        if find_injection(pl_module) is not None:
            return  # setup runs again on every fit/validate: never inject twice
        if not getattr(pl_module.configure_model, "_peft_wrapped", False):
            pl_module.configure_model = self._after_configure_model(trainer, pl_module)
        try:
            select_targets(self.adapted_module(pl_module), self.config)
        except ValueError:
            if not is_overridden("configure_model", pl_module):
                raise  # no configure_model will build the targets later: the config is wrong
            return  # the layers do not exist yet: inject after configure_model
        self._inject(trainer, pl_module)

    def _after_configure_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        user_configure_model = pl_module.configure_model

        @functools.wraps(user_configure_model)
        def configure_model() -> None:
            user_configure_model()
            if find_injection(pl_module) is None:
                self._inject(trainer, pl_module)

        configure_model._peft_wrapped = True
        return configure_model

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.report is None:
            return
        metrics = {
            "peft/trainable_params": float(self.report.trainable_params),
            "peft/trainable_fraction": self.report.trainable_fraction,
        }
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=0)

    # -- checkpoints ----------------------------------------------------------------------------

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint["lightning_peft"] = {
            "method": self.config.method,
            "config": self.config.to_dict(),
        }
        if is_sharded_strategy(trainer.strategy) and not _full_checkpoint(trainer.strategy):
            return  # sharded checkpoints are loaded in place: they keep the frozen keys too
        # The adapters, plus whatever else trains: e.g. a task head the LightningModule holds
        # outside the adapted transformers model.
        keep = set(adapter_state_dict(pl_module))
        keep |= {name for name, p in pl_module.named_parameters() if p.requires_grad}
        keep = {clean_name(name) for name in keep}  # FSDP1 wrappers rename, its state dict not
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    # -- end of training ------------------------------------------------------------------------

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_adapter_to is not None:
            state = full_state_dict(trainer.strategy, pl_module)  # a collective on sharded runs
            try:
                if trainer.is_global_zero:
                    save_adapter(pl_module, self.save_adapter_to, state_dict=state, overwrite=True)
                    rank_zero_info(f"PEFTCallback: adapter written to {self.save_adapter_to}")
            finally:  # should rank zero fail, the other ranks must not wait here forever
                trainer.strategy.barrier("peft_save_adapter")
        if self.merge_on_train_end:
            merge_adapters(pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"method": self.config.method, "config": self.config.to_dict()}


def _is_transformers_model(module: nn.Module) -> bool:
    return hasattr(module, "config") and callable(getattr(module, "get_input_embeddings", None))


def _data_parallel_mesh(pl_module: pl.LightningModule):
    mesh = getattr(pl_module, "device_mesh", None)
    if mesh is not None and mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names:
        return mesh["data_parallel"]
    return mesh


def _full_checkpoint(strategy) -> bool:
    """Whether a sharded strategy writes a full (gathered) checkpoint rather than shards."""
    if hasattr(strategy, "_save_distributed_checkpoint"):
        return not strategy._save_distributed_checkpoint
    return getattr(strategy, "_state_dict_type", "full") == "full"
