"""Two-process ``PEFTCallback`` runs on CPU (gloo), shared by ``test_callback_distributed.py``.

``python tests/distributed_script.py OUT STRATEGY [STRATEGY ...]`` runs, for each strategy in
turn (``ddp``, ``fsdp2``, ``fsdp2_full``, ``fsdp``), two fits under ``OUT/STRATEGY``: the first
trains ``FIRST_STEPS`` steps, checkpoints and writes the PEFT adapter directory; the second
resumes from that checkpoint. ``strategy="ddp"`` and the FSDP strategies launch their second
process by re-running this command, so they run from this script, never inside pytest.
``ddp_spawn`` runs in-process: the test calls ``run("ddp_spawn", out)`` itself.

Every rank writes what the tests assert on (ddp_spawn's workers' modules never come back):

- ``first_rank{r}.pt``: full (gathered) tensors and the local optimizer state at the start and
  end of the first fit, its losses, and the eval logits of the trained model on ``IDS``;
- ``resumed_rank{r}.pt``: full tensors and optimizer state at ``on_train_start`` of the resume;
- ``adapter/``: the ``save_adapter_to`` directory; ``ckpt/first.ckpt``: the checkpoint;
- in both records, the torch random state: the first run's when it checkpointed (each rank
  seeds its own at ``on_train_start``), the resumed run's once the checkpoint is loaded; the
  first run's records also hold the callback's warnings about adapters without gradients;
- ``mismatch_rank{r}.txt``: the error of a third fit that resumes with another config.

FSDP1 (``fsdp``) cannot save the adapter yet: its first fit goes without ``save_adapter_to``,
and a third, one-step fit tries it, writing ``save_rank{r}.pt`` if it works and
``save_error_rank{r}.txt`` if not.
"""

from __future__ import annotations

import copy
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests.helpers, run as a script

from lightning_peft import LoRAConfig, PEFTCallback, adapter_state_dict
from lightning_peft.core.distributed import clean_name
from lightning_peft.lightning.distributed import full_state_dict
from tests.helpers.lightning_modules import CausalLM, random_tokens

CONFIG = LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
FIRST_STEPS = 3
RESUMED_STEPS = 4
IDS = random_tokens(4, seed=1)
SUBPROCESS_STRATEGIES = ("ddp", "fsdp2", "fsdp2_full", "fsdp")


class CPUFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` (FSDP1) made to run on CPU for tests: Lightning refuses FSDP without a
    GPU only for the stock class, FSDP needs ``device_id=cpu`` to place its flat parameters,
    and full state dicts are gathered without CPU offload (which segfaults on CPU tensors)."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            model = FullyShardedDataParallel(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=torch.device("cpu"),  # Lightning passes root_device.index: None here
                **self.kwargs,
            )
            self.kwargs.pop("auto_wrap_policy", None)  # applied: the rest of setup must not warn
        return super()._setup_model(model)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        with _no_cpu_offload():
            return super().lightning_module_state_dict()

    def optimizer_state(self, optimizer) -> dict[str, Tensor]:
        with _no_cpu_offload():
            return super().optimizer_state(optimizer)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        with _no_cpu_offload():
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)

    def full_state_dict_on_every_rank(self) -> dict[str, Tensor]:
        """The gathered state dict on every rank (Lightning's holds it on rank zero only)."""
        with _full_state_dict_context(self.model, self.world_size, rank0_only=False):
            return self.model.state_dict()


def _full_state_dict_context(module: torch.nn.Module, world_size: int, rank0_only: bool = True):
    """Lightning's ``_get_full_state_dict_context`` with ``offload_to_cpu=False``."""
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.state_dict_type(
        module=module,
        state_dict_type=StateDictType.FULL_STATE_DICT,
        state_dict_config=FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        optim_state_dict_config=FullOptimStateDictConfig(
            offload_to_cpu=False, rank0_only=rank0_only
        ),
    )


@contextmanager
def _no_cpu_offload():
    """Inside, Lightning's FSDP code gathers full state dicts without CPU offload."""
    import lightning.fabric.strategies.fsdp as fabric_fsdp
    import lightning.pytorch.strategies.fsdp as pl_fsdp

    originals = pl_fsdp._get_full_state_dict_context, fabric_fsdp._get_full_state_dict_context
    pl_fsdp._get_full_state_dict_context = _full_state_dict_context
    fabric_fsdp._get_full_state_dict_context = _full_state_dict_context
    try:
        yield
    finally:
        pl_fsdp._get_full_state_dict_context, fabric_fsdp._get_full_state_dict_context = originals


def make_strategy(name: str) -> str | Strategy:
    """The Lightning strategy for a test name (FSDP2: data-parallel over both processes)."""
    if name == "fsdp2":
        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    if name == "fsdp2_full":
        return ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False
        )
    if name == "fsdp":
        return CPUFSDPStrategy(
            process_group_backend="gloo", use_orig_params=True, auto_wrap_policy=_llama_layers()
        )
    return name


def _llama_layers() -> set[type]:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return {LlamaDecoderLayer}


def make_callback(name: str, **kwargs) -> PEFTCallback:
    """``PEFTCallback`` for the strategy; FSDP2 shards each decoder layer after injecting."""
    if name.startswith("fsdp2"):
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        kwargs["fsdp2_layer_cls"] = LlamaDecoderLayer
    return PEFTCallback(copy.deepcopy(CONFIG), verbose=False, **kwargs)


def make_module(name: str) -> CausalLM:
    """FSDP2 users build the model in ``configure_model``; the others in ``__init__``."""
    return CausalLM(build_in_configure_model=name.startswith("fsdp2"))


def _local(value: Any) -> Any:
    """A detached CPU copy, DTensors as their local shard, containers recursively."""
    if isinstance(value, dict):
        return {k: _local(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_local(v) for v in value)
    if isinstance(value, Tensor):
        if hasattr(value, "to_local"):
            value = value.to_local()
        return value.detach().cpu().clone()
    return copy.deepcopy(value)


class Recorder(Callback):
    """Writes ``{tag}_rank{r}.pt``: full tensors and optimizer state at the start (and with
    ``at_end`` the end) of training, the losses, the trained model's eval logits, and the torch
    random state when a checkpoint is saved or loaded (place it after ``PEFTCallback``).

    ``seed``: each rank seeds torch with ``seed + rank`` at ``on_train_start``."""

    def __init__(self, out: Path, tag: str, at_end: bool = True, seed: int | None = None) -> None:
        self.out, self.tag, self.at_end, self.seed = out, tag, at_end, seed
        self.record: dict[str, Any] = {}
        self.rng: Tensor | None = None
        self.catching: warnings.catch_warnings | None = None
        self.caught: list = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.catching = warnings.catch_warnings(record=True)
        self.caught = self.catching.__enter__()
        warnings.simplefilter("always")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.catching is not None:
            self.catching.__exit__(None, None, None)
            self.catching = None

    def snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        if isinstance(trainer.strategy, CPUFSDPStrategy):
            full = trainer.strategy.full_state_dict_on_every_rank()
        else:
            full = full_state_dict(trainer.strategy, pl_module)  # a collective under FSDP2
        adapter_keys = {clean_name(k) for k in adapter_state_dict(pl_module)}
        return {
            "adapters": {k: _local(v) for k, v in full.items() if k in adapter_keys},
            "frozen": {k: _local(v) for k, v in full.items() if k not in adapter_keys},
            "optimizer": _local(trainer.optimizers[0].state_dict()),
            "step": trainer.global_step,
        }

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.rng = torch.get_rng_state()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.rng = torch.get_rng_state()  # PEFTCallback, called before, has restored it

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.record = {"start": self.snapshot(trainer, pl_module), "rank": trainer.global_rank}
        if self.seed is not None:
            torch.manual_seed(self.seed + trainer.global_rank)
        if not self.at_end:
            self.write(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.at_end:
            return
        self.record["end"] = self.snapshot(trainer, pl_module)
        self.record["losses"] = list(pl_module.losses)
        self.record["logits"] = eval_logits(trainer, pl_module)
        self.write(trainer)

    def write(self, trainer: pl.Trainer) -> None:
        self.record["rng"] = self.rng
        self.record["warnings"] = [str(w.message) for w in self.caught]
        torch.save(self.record, self.out / f"{self.tag}_rank{trainer.global_rank}.pt")


def eval_logits(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor:
    """Logits of the trained model on ``IDS`` in eval mode (every rank runs it: FSDP gathers)."""
    was_training = pl_module.training
    pl_module.eval()
    try:
        with torch.no_grad(), _full_params(trainer):
            return pl_module.model(input_ids=IDS).logits.detach().clone()
    finally:
        pl_module.train(was_training)


@contextmanager
def _full_params(trainer: pl.Trainer):
    """FSDP1 keeps flat shards outside its own forward: unshard them for a direct call."""
    if isinstance(trainer.strategy, FSDPStrategy):
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(trainer.strategy.model):
            yield
    else:
        yield


def make_trainer(name: str, out: Path, callbacks: list[Callback], max_steps: int) -> pl.Trainer:
    """Two CPU processes, quiet; checkpoints only where a ``ModelCheckpoint`` is given."""
    return pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=2,
        strategy=make_strategy(name),
        default_root_dir=out,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        logger=False,
        callbacks=callbacks,
    )


def checkpoint_path(out: Path) -> Path:
    """The first fit's checkpoint: a file, or a directory of shards (FSDP2 by default)."""
    return out / "ckpt" / "first.ckpt"


def run(name: str, out: Path) -> None:
    """Train, checkpoint and save the adapter, then resume, then resume with another config,
    under strategy ``name``."""
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = ModelCheckpoint(
        dirpath=out / "ckpt", filename="first", every_n_train_steps=FIRST_STEPS
    )
    save_to = None if name == "fsdp" else out / "adapter"  # FSDP1: see save_adapter_fsdp1
    first = [
        make_callback(name, save_adapter_to=save_to),
        checkpoint,
        Recorder(out, "first", seed=100),
    ]
    make_trainer(name, out, first, FIRST_STEPS).fit(make_module(name))

    resumed = [make_callback(name), Recorder(out, "resumed", at_end=False)]
    make_trainer(name, out, resumed, RESUMED_STEPS).fit(
        make_module(name), ckpt_path=checkpoint_path(out)
    )
    resume_with_another_config(name, out)
    if name == "fsdp":
        save_adapter_fsdp1(out)


def resume_with_another_config(name: str, out: Path) -> None:
    """Resume with k_proj instead of q_proj/v_proj; each rank writes the error it gets."""
    callback = make_callback(name)
    callback.config = LoRAConfig(r=4, lora_alpha=8, target_modules=["k_proj"])
    trainer = make_trainer(name, out, [callback], RESUMED_STEPS)
    try:
        trainer.fit(make_module(name), ckpt_path=checkpoint_path(out))
        message = "no error"
    except Exception as error:
        message = f"{type(error).__name__}: {error}"
    (out / f"mismatch_rank{trainer.global_rank}.txt").write_text(message)


def save_adapter_fsdp1(out: Path) -> None:
    """One step with ``save_adapter_to`` under FSDP1; rank zero writes the error if it fails."""
    callbacks = [make_callback("fsdp", save_adapter_to=out / "adapter"), Recorder(out, "save")]
    trainer = make_trainer("fsdp", out, callbacks, 1)
    try:
        trainer.fit(make_module("fsdp"))
    except Exception as error:
        (out / f"save_error_rank{trainer.global_rank}.txt").write_text(f"{error!r}")


def main(argv: list[str]) -> None:
    """``OUT STRATEGY [STRATEGY ...]``: ``run`` each strategy into ``OUT/STRATEGY``."""
    out, names = Path(argv[0]), argv[1:]
    for name in names:
        if name not in SUBPROCESS_STRATEGIES:
            raise SystemExit(f"unknown strategy {name!r}; choose from {SUBPROCESS_STRATEGIES}")
        run(name, out / name)


if __name__ == "__main__":
    main(sys.argv[1:])
