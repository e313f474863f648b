"""``PEFTCallback``: adapters for any LightningModule, with adapter-only checkpoints.

Lightning's hook order in ``fit`` is ``Callback.setup`` -> ``LightningModule.setup`` ->
``configure_model`` -> checkpoint restore (sharded strategies: after the optimizers) -> the
strategy wraps the model -> ``configure_optimizers`` -> ``on_fit_start`` -> ``on_train_start``
-> the steps.

Injection. The callback injects in ``setup`` when the target layers exist then (a model built in
``__init__``), else right after the user's ``configure_model`` (a model built in
``LightningModule.setup`` or ``configure_model``, the pattern for large and FSDP2 models),
always before a checkpoint is restored, the model is wrapped or the optimizer is built; never
twice. Lightning calls ``configure_model`` only when ``is_overridden`` says so, which looks
through ``functools.wraps``: the callback's step is a plain function, so it is called whether or
not the LightningModule defines ``configure_model``. Should no adapter be in the model anyway
when the optimizers are built, ``on_fit_start`` raises before any step.

Checks before any work. ``setup`` refuses what can be known early: a ``save_adapter_to`` that
cannot be written or already holds an adapter, a ``ckpt_path`` that is missing, unreadable or
truncated, or was trained with another adapter method or config; then injection refuses a config
that does not fit the model, and a checkpoint whose tensors do not fit it. The model is untouched
when these raise (but for the last, which needs the adapters in place). The same checkpoint checks
run again when Lightning loads the checkpoint (``on_load_checkpoint``), so they hold even if the
early reading of ``ckpt_path`` finds nothing.

Exact resume. A checkpoint holds each process's random states (torch CPU and current CUDA
generator, numpy, Python, the training DataLoaders' generators: ``random_state``). The callback
restores them when Lightning loads the checkpoint, before the training loop creates its first
DataLoader iterator (the DataLoaders' own generators at ``on_train_start``). Resuming from a
checkpoint written at the end of an epoch then reproduces an uninterrupted run bit for bit, with
dropout and shuffling (tested for LoRA, DoRA and adapters), under these conditions:

- ``max_epochs`` bounds the run, not ``max_steps``: with ``max_steps`` set, Lightning 2.6 resumes
  an end-of-epoch checkpoint inside the finished epoch and trains one batch there (with
  ``max_epochs`` also set it then stops an epoch early); the callback warns;
- the same number of processes (each restores its own states; with another number none are
  restored, with a warning);
- no hook draws random numbers between the restore and the first batch that the uninterrupted
  run did not draw (e.g. in ``on_fit_start`` or ``on_train_start``); with a DataLoader's own
  ``generator`` and ``num_workers > 0``, the first resumed epoch's worker seeds differ (its
  iterator exists before the generator can be restored);
- deterministic kernels (CPU; on GPUs ``torch.use_deterministic_algorithms``).

Mid-epoch resumption (a checkpoint from ``every_n_train_steps``, or an interruption): Lightning
restores the loop counters, the optimizer and the model, and the position inside the epoch only
for DataLoaders that implement ``state_dict``/``load_state_dict`` (e.g. torchdata's
``StatefulDataLoader``). A plain ``DataLoader`` restarts from the first batch of the epoch while
the batch index continues: the first ``k`` batches are trained again and the last ``k`` are not
seen in that epoch (Lightning warns); a shuffling sampler draws a new order at that restart.
Such a resumed run trains, but it is not the uninterrupted run. The random states are
restored all the same.

Adapters that never act. After the first backward pass, adapters whose parameters received no
gradient (a module whose ``forward`` is bypassed, an expert no token reached) are named in a
warning; if no adapter received one, the run cannot train them and the callback raises. A warning,
not an error, for some: modules may be legitimately unused in a step (a mixture of experts).
Under DDP and FSDP every rank decides on the gradients summed over the ranks (a module counts as
acting if it did on any rank). FSDP1's flat parameters may give a bypassed adapter a zero
gradient rather than none; there it may go unnoticed. DeepSpeed moves gradients into its own
partitions, and manual optimization may step before every backward pass: no check there.

Divergence (``check_finite=True``, the default). Before every optimizer step the callback tests
the loss of each backward pass since the last step and the gradients of every trained tensor for
NaN and infinity: one fused norm reduction over all of them and one host synchronisation (plus
one scalar all-reduce when there are several processes); a flagged tensor is confirmed exactly
(an L2 norm also overflows for huge finite values). At the first non-finite value ``fit`` stops
with a ``DivergenceError`` naming the step, the first trained tensor whose gradient is not
finite, and the newest checkpoint whose tensors are all finite; the adapters are not updated
with it, and nothing is written to ``save_adapter_to``. Under a gradient scaler (``16-mixed``) a
step the scaler skips (its own inf/NaN check after unscaling) is not an error: the scaler lowers
its scale and goes on. An adapter that is not finite when training ends (an update that
overflowed in the last step) is not written either. ``check_finite=False`` leaves all of this to
Lightning (no check; a non-finite adapter is written, with a warning). DeepSpeed frees
``.grad``: there only the loss is tested.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_peft.core.adapter import AdapterConfigLike
from lightning_peft.core.distributed import clean_name, is_sharded_strategy, strategy_is
from lightning_peft.core.errors import InputError
from lightning_peft.lightning import random_state
from lightning_peft.lightning.checkpoints import (
    CheckpointContents,
    check_config,
    check_tensors,
    config_differences,
    loaded_contents,
    model_keys,
    read_checkpoint,
    requested_ckpt_path,
    warn_if_resumed_inside_a_finished_epoch,
)
from lightning_peft.lightning.checks import (
    FiniteCheck,
    check_gradients,
    trained_tensors,
    warn_non_finite,
)
from lightning_peft.lightning.distributed import (
    data_parallel_mesh,
    fsdp2_shard,
    full_checkpoint,
    full_state_dict,
    is_transformers_model,
)
from lightning_peft.lightning.multi_adapter import (
    BatchRouting,
    adopt_differences,
    check_adapters_config,
    checked_adapters,
    inject_all,
    saved_adapters,
)
from lightning_peft.lightning.precision import quantize_for_precision
from lightning_peft.lightning.saving import save_or_fall_back
from lightning_peft.methods.registry import method_for
from lightning_peft.model.helpers import active_state_dict, merge_adapters
from lightning_peft.model.injection import find_injection, inject_adapters, injection_report
from lightning_peft.model.sites import DEFAULT_NAME
from lightning_peft.model.targeting import select_targets
from lightning_peft.peft_format.files import adapter_directory, check_save_directory

_UNSET = object()  # the callback has not replaced configure_model
_ABSENT = object()  # it has, and the LightningModule had no instance attribute of that name


class PEFTCallback(Callback):
    """Fine-tune any LightningModule with LoRA, DoRA, bottleneck adapters, IA³ or prompt tuning.

    The base model is frozen, only adapters (plus ``modules_to_save`` and chosen biases) train,
    checkpoints hold only those tensors and the adapter config, and resuming with
    ``trainer.fit(..., ckpt_path=...)`` restores them, the optimizer state and the random
    states (the callback sets ``strict_loading = False``; it checks the checkpoint itself).
    See the module docstring for when injection happens, what is checked before any work, and
    what an exact resume needs.

    Args:
        config: the config of a registered method (``LoRAConfig``, ``AdapterConfig``,
            ``IA3Config``, ``PromptTuningConfig``).
        adapters: instead of ``config``, several named adapters trained together,
            ``{name: config}`` (one method; ``lightning_peft.lightning.multi_adapter``): each
            batch is a dict whose field ``"adapter_names"`` names each row's adapter (removed
            before ``training_step`` sees the batch); each adapter learns from its own rows;
            ``save_adapter_to`` gets peft's layout (``default`` there, the others in
            ``<dir>/<name>``). ``adapter_param_groups(model)`` gives each its optimizer group.
        merge_on_train_end: merge LoRA/DoRA/IA³ into the base weights when training ends
            (single device and DDP; refused under sharded strategies).
        save_adapter_to: write the Hugging Face PEFT-format adapter directory here when
            training ends (rank zero; full tensors gathered under FSDP/FSDP2). Checked before
            training; should writing fail anyway, the adapter goes to
            ``<log dir>/peft_adapter_fallback`` and the error names it.
        overwrite: allow ``save_adapter_to`` to hold an adapter already (replaced at the end).
        verbose: print the table of adapted modules on rank zero.
        module: the attribute path of the submodule to adapt (e.g. ``"model"``). By default the
            single transformers model held by the LightningModule if there is one (so that saved
            adapters load into it with ``peft``), else the LightningModule itself.
        fsdp2_layer_cls: with ``ModelParallelStrategy``, the block class(es) to shard with FSDP2
            after injection (e.g. ``LlamaDecoderLayer``); the user's ``configure_model`` then only
            builds the model. Users who shard themselves call ``inject_adapters`` first.
        check_finite: stop ``fit`` at the first NaN or infinity in the loss or the trained
            gradients, and never write a non-finite adapter (see the module docstring). False:
            no check, as in Lightning (a non-finite adapter is written, with a warning).

    Raises (from ``trainer.fit``, before the first optimizer step; ``InputError`` is a
    ``ValueError``):
        InputError: no module matches the targets (naming close matches), the config does not
            fit the model, ``save_adapter_to`` is not writable or holds an adapter, ``ckpt_path``
            is missing, unreadable, or trained with another method, config or model, the model
            already has adapters of another config, ``merge_on_train_end`` under a sharded
            strategy, the optimizers hold no adapter, or no adapter received a gradient in the
            first step.
        DivergenceError: (a ``RuntimeError``, during training) the loss or a trained gradient
            is NaN or infinite, or (at the end) a trained tensor is; named with the step and the
            newest finite checkpoint. Nothing is written to ``save_adapter_to`` then.
        RuntimeError: (at the end) the adapter could not be written to ``save_adapter_to``; the
            message names the fallback directory it was written to.

    Example::

        config = LoRAConfig(r=16, target_modules=["q_proj", "v_proj"])
        trainer = Trainer(callbacks=[PEFTCallback(config)])
        trainer.fit(model)  # model: any LightningModule
    """

    def __init__(
        self,
        config: AdapterConfigLike | None = None,
        *,
        adapters: Mapping[str, AdapterConfigLike] | None = None,
        merge_on_train_end: bool = False,
        save_adapter_to: str | Path | None = None,
        overwrite: bool = False,
        verbose: bool = True,
        module: str | None = None,
        fsdp2_layer_cls: type | tuple[type, ...] | None = None,
        check_finite: bool = True,
    ) -> None:
        if (config is None) == (adapters is None):
            raise ValueError("PEFTCallback takes a config or adapters={name: config}, not both")
        self.adapters = checked_adapters(adapters) if adapters is not None else None
        if self.adapters is not None:
            config = next(iter(self.adapters.values()))
            if merge_on_train_end:
                raise ValueError(
                    "merge_on_train_end with adapters=...: merging several adapters would sum "
                    "them into one set of weights; save them (save_adapter_to=...) instead"
                )
        method = method_for(config)  # TypeError for a config of no registered method
        if merge_on_train_end and not method.mergeable:
            layer = next(cls for cls in method.layers if not cls.mergeable)
            raise ValueError(
                f"merge_on_train_end: {layer.__name__} adapters {layer.why_not_mergeable}"
            )
        self.config = config
        self.merge_on_train_end = merge_on_train_end
        self.save_adapter_to = Path(save_adapter_to) if save_adapter_to is not None else None
        self.overwrite = overwrite
        self.verbose = verbose
        self.module = module
        self.fsdp2_layer_cls = fsdp2_layer_cls
        self.check_finite = check_finite
        self.report = None
        self._trainer: pl.Trainer | None = None
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        """What one ``fit``/``validate`` call tracks."""
        self._checkpoint: CheckpointContents | None = None  # read from ckpt_path in setup
        self._states_to_restore: dict[str, Any] | None = None  # this process's, for the loaders
        self._gradients_checked = False
        self._finite = FiniteCheck()  # the losses and trained tensors the finite check reads
        self._training_done = False
        self._replaced_configure_model: Any = _UNSET
        self._routing = BatchRouting()

    # -- injection ------------------------------------------------------------------------------

    def adapted_module(self, pl_module: pl.LightningModule) -> nn.Module:
        """The module that gets the adapters (see ``module`` in the class docstring)."""
        if self.module is not None:
            try:
                return pl_module.get_submodule(self.module)
            except AttributeError as error:
                raise InputError(f"PEFTCallback(module={self.module!r}): {error}") from None
        hf_models = [c for c in pl_module.children() if is_transformers_model(c)]
        return hf_models[0] if len(hf_models) == 1 else pl_module

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        self._reset_run_state()
        if stage == "fit":
            self._check_fit_options(trainer)
        ckpt_path = requested_ckpt_path(trainer)
        if ckpt_path is not None and "://" not in ckpt_path:  # remote paths: checked on load
            deepspeed = strategy_is(trainer.strategy, "DeepSpeedStrategy")
            self._checkpoint = read_checkpoint(ckpt_path, self.state_key, deepspeed)
            if self._checkpoint is not None:
                self._check_config(self._checkpoint, resuming=stage == "fit")
        pl_module.strict_loading = False  # checkpoints hold only the trained tensors
        if find_injection(pl_module) is not None:
            self._adopt_injection(pl_module)  # setup runs on every fit/validate: inject once
            return
        try:
            for config in self._configs():
                select_targets(self.adapted_module(pl_module), config)
        except ValueError:
            # The targets do not exist yet (or never will: then configure_model raises).
            self._inject_after_configure_model(trainer, pl_module)
            return
        self._inject(trainer, pl_module)

    def _inject_after_configure_model(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> None:
        """Make the LightningModule's ``configure_model`` inject after the user's own (which
        may be Lightning's empty default): an instance attribute, removed when it has run."""
        user_configure_model = pl_module.configure_model
        self._replaced_configure_model = pl_module.__dict__.get("configure_model", _ABSENT)

        def configure_model() -> None:  # no functools.wraps: is_overridden must see a new function
            self._restore_configure_model(pl_module)
            user_configure_model()
            if find_injection(pl_module) is None:
                self._inject(trainer, pl_module)
            else:  # the user's configure_model injected (e.g. to shard themselves)
                self._adopt_injection(pl_module)

        pl_module.configure_model = configure_model

    def _restore_configure_model(self, pl_module: pl.LightningModule) -> None:
        replaced, self._replaced_configure_model = self._replaced_configure_model, _UNSET
        if replaced is _ABSENT:
            pl_module.__dict__.pop("configure_model", None)
        elif replaced is not _UNSET:
            pl_module.configure_model = replaced

    def _inject(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        root = self.adapted_module(pl_module)
        try:
            quantize_for_precision(trainer, pl_module, root, self.config)  # BitsandbytesPrecision
            if self.adapters is None:
                self.report = inject_adapters(root, self.config)
            else:
                self.report = inject_all(root, self.adapters)
        except ValueError as error:  # no target matched (naming close matches), or does not fit
            if isinstance(error, InputError):
                raise
            raise InputError(str(error)) from error
        self._check_checkpoint_tensors(pl_module, with_shapes=True)
        if self.fsdp2_layer_cls is not None and is_sharded_strategy(trainer.strategy):
            fsdp2_shard(root, self.fsdp2_layer_cls, mesh=data_parallel_mesh(pl_module))
        if self.verbose:
            rank_zero_info(f"PEFTCallback ({self.report.method}):\n{self.report}")

    def _adopt_injection(self, pl_module: pl.LightningModule) -> None:
        """The model has adapters already: keep them if they are this config's."""
        config = find_injection(pl_module)[2].config
        if self.adapters is not None:
            differences = adopt_differences(self.adapted_module(pl_module), self.adapters)
        else:
            differences = config_differences(
                method_for(config).name, config.to_dict(), self.config, source="the model"
            )
        if differences:
            raise InputError(
                "the model already has adapters of another configuration ("
                + "; ".join(differences[:4])
                + "): remove them with unload(model) first, or pass the model's configuration"
            )
        self._check_checkpoint_tensors(pl_module, with_shapes=True)
        self.report = injection_report(pl_module)

    def _check_checkpoint_tensors(self, pl_module: pl.LightningModule, with_shapes: bool) -> None:
        if self._checkpoint is None:
            return
        trained = trained_tensors(pl_module)
        shapes = {k: tuple(p.shape) if with_shapes else None for k, p in trained.items()}
        check_tensors(self._checkpoint, shapes, model_keys(pl_module))

    def _check_fit_options(self, trainer: pl.Trainer) -> None:
        if self.merge_on_train_end and is_sharded_strategy(trainer.strategy):
            raise InputError(
                f"merge_on_train_end is not supported under {type(trainer.strategy).__name__}: "
                "the base weights are sharded. Save the adapter (save_adapter_to=...) and merge "
                "it into an unsharded model with load_adapter + merge_adapters"
            )
        if self.save_adapter_to is not None:
            try:
                for name in self.adapters or [DEFAULT_NAME]:
                    check_save_directory(
                        adapter_directory(self.save_adapter_to, name), self.overwrite
                    )
            except OSError as error:
                raise InputError(f"save_adapter_to: {error}") from error

    # -- before the first step ------------------------------------------------------------------

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if find_injection(pl_module) is None:
            self._restore_configure_model(pl_module)
            try:
                select_targets(self.adapted_module(pl_module), self.config)
            except ValueError as error:
                raise InputError(str(error)) from error
            targets = getattr(self.config, "target_modules", None)
            what = f"target_modules={targets!r}" if targets is not None else "its targets"
            raise InputError(
                f"PEFTCallback: the model has no adapters when training starts although {what} "
                "match modules now: they were built after configure_model. Build the model in "
                "__init__, setup or configure_model"
            )
        self._check_optimizers(trainer, pl_module)
        if trainer.is_global_zero and self.report is not None:
            metrics = {
                "peft/trainable_params": float(self.report.trainable_params),
                "peft/trainable_fraction": self.report.trainable_fraction,
            }
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=0)

    def _check_optimizers(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Every adapter parameter must be in an optimizer (built after injection)."""
        groups = [group for optimizer in trainer.optimizers for group in optimizer.param_groups]
        in_optimizers = {id(p) for group in groups for p in group["params"]}
        parameters = {clean_name(n): p for n, p in pl_module.named_parameters()}
        if not in_optimizers & {id(p) for p in parameters.values()}:
            return  # the strategy's optimizer holds copies (DeepSpeed's flat partitions)
        adapters = [k for k in active_state_dict(pl_module) if k in parameters]
        left_out = [k for k in adapters if id(parameters[k]) not in in_optimizers]
        if not left_out:
            return
        message = (
            f"the optimizers hold {len(adapters) - len(left_out)} of the {len(adapters)} adapter "
            f"parameters (not {', '.join(left_out[:3])}{', ...' if len(left_out) > 3 else ''}): "
            "build them in configure_optimizers from self.parameters(); the adapters are "
            "injected before it runs"
        )
        if len(left_out) == len(adapters):
            raise InputError(f"PEFTCallback: nothing would train: {message}")
        rank_zero_warn(f"PEFTCallback: {message}")

    def _restore_random_states(self, trainer: pl.Trainer, states: list[dict] | None) -> None:
        """This process's random states from the checkpoint, right away (before the training
        loop draws from them); its DataLoaders' generators at ``on_train_start``."""
        if states is None:
            return
        if len(states) != trainer.world_size:
            rank_zero_warn(
                f"PEFTCallback: the checkpoint holds the random states of {len(states)} "
                f"processes, this run has {trainer.world_size}: they are not restored, so "
                "dropout and shuffling differ from an uninterrupted run"
            )
            return
        self._states_to_restore = states[trainer.global_rank]
        self._warn_skipped(random_state.restore(self._states_to_restore))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state, self._states_to_restore = self._states_to_restore, None
        if state is not None:
            self._warn_skipped(random_state.restore_loaders(state, trainer.train_dataloader))

    @staticmethod
    def _warn_skipped(skipped: list[str]) -> None:
        if skipped:
            rank_zero_warn(f"PEFTCallback: random states not restored: {'; '.join(skipped)}")

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._finite.batch_idx = batch_idx
        if self.adapters is not None:
            self._routing.enter(self.adapted_module(pl_module), batch, self.adapters)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        self._routing.exit()

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if self.adapters is not None:
            self._routing.enter(self.adapted_module(pl_module), batch, self.adapters)

    @override
    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._routing.exit()

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        if not self._gradients_checked and not loss.requires_grad:
            # Else backward fails with torch's "element 0 of tensors does not require grad".
            raise InputError(
                "PEFTCallback: the loss does not depend on any trained tensor: the forward pass "
                "never calls the adapted modules (it may read their weights directly, or a hub "
                "kernel may have replaced a parent module's forward), or the loss was computed "
                "without autograd; choose other target_modules"
            )
        if self.check_finite:
            self._finite.add_loss(loss)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        deepspeed = strategy_is(trainer.strategy, "DeepSpeedStrategy")
        if not self._gradients_checked:
            self._gradients_checked = True
            # Manual optimization may step before every backward pass has run; DeepSpeed frees
            # .grad.
            if pl_module.automatic_optimization and not deepspeed:
                check_gradients(trainer, pl_module)
        if self.check_finite:
            self._finite.check(
                trainer, pl_module, optimizer, not deepspeed, save_adapter_to=self.save_adapter_to
            )

    # -- checkpoints ----------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint records of this callback: read back in ``on_load_checkpoint``."""
        state = {
            "method": method_for(self.config).name,
            "config": self.config.to_dict(),
            "random_states": self._gather_random_states(),
        }
        if self.adapters is not None:
            state["adapters"] = saved_adapters(self.adapters)
        return state

    def _configs(self) -> list[AdapterConfigLike]:
        return [self.config] if self.adapters is None else list(self.adapters.values())

    def _check_config(self, contents: CheckpointContents, resuming: bool) -> None:
        check_config(contents, self.config, resuming)
        if self.adapters is not None and contents.peft_state is not None:
            check_adapters_config(contents, self.adapters)

    def _gather_random_states(self) -> list[dict[str, Any]]:
        """Each process's random states, by global rank (a collective: Lightning builds a
        checkpoint on every process)."""
        trainer = self._trainer
        loaders = trainer.train_dataloader if trainer is not None and trainer.training else None
        local = random_state.capture(random_state.loader_generators(loaders))
        if trainer is None or trainer.world_size == 1 or not torch.distributed.is_initialized():
            return [local]
        gathered: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, local)
        return gathered

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if is_sharded_strategy(trainer.strategy) and not full_checkpoint(trainer.strategy):
            return  # sharded checkpoints are loaded in place: they keep the frozen keys too
        keep = set(trained_tensors(pl_module))
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        contents = loaded_contents(checkpoint, trainer.ckpt_path, self.state_key)
        self._check_config(contents, resuming=trainer.state.fn == "fit")
        trained = dict.fromkeys(trained_tensors(pl_module))  # shapes: checked before wrapping
        check_tensors(contents, trained, model_keys(pl_module))
        if trainer.state.fn == "fit":
            self._restore_random_states(trainer, contents.peft_state.get("random_states"))
            warn_if_resumed_inside_a_finished_epoch(trainer, checkpoint)

    # -- end of training ------------------------------------------------------------------------

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._training_done:
            return
        # Lightning skips the training loop, on_train_end included, when the restored run had
        # already reached its limits (or limit_train_batches=0): the end work happens here.
        if self.save_adapter_to is not None or self.merge_on_train_end:
            rank_zero_warn(
                "PEFTCallback: no training step ran in this fit (the checkpoint's run had already "
                "reached the trainer's limits, or there are no training batches); the adapter "
                "is saved or merged as it is"
            )
        self._finish(trainer, pl_module)

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._training_done = True
        if self.save_adapter_to is not None:
            self._save_adapter(trainer, pl_module)
        if self.merge_on_train_end:
            merge_adapters(pl_module)

    def _save_adapter(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a broadcast: every rank
        state = full_state_dict(trainer.strategy, pl_module)  # a collective on sharded runs
        try:
            if trainer.is_global_zero:
                if not self.check_finite:
                    warn_non_finite(pl_module, state)
                save_or_fall_back(
                    pl_module,
                    self.save_adapter_to,
                    state,
                    run_dir,
                    self.overwrite,
                    allow_non_finite=not self.check_finite,
                )
        finally:  # should rank zero fail, the other ranks must not wait here forever
            trainer.strategy.barrier("peft_save_adapter")

    # -- clean-up -------------------------------------------------------------------------------

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._routing.exit()
        self._restore_configure_model(pl_module)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._routing.exit()
        self._restore_configure_model(pl_module)
