"""What a ``PEFTCallback`` checkpoint must agree on with the run that loads it.

The callback's state in a checkpoint (``checkpoint["callbacks"][PEFTCallback.state_key]``)
holds the adapter method and config the run was trained with, and its random states; the
checkpoint's ``state_dict`` holds the trained tensors (adapters, ``modules_to_save``, other
trainable parameters) and, in sharded (FSDP/FSDP2) checkpoints, the frozen base tensors too.

A checkpoint is refused, naming the first differences, when it was not written by the callback,
when its method or config differ from the run's, when it lacks a tensor the run trains, holds a
tensor the model does not have, or has another shape for one. Frozen base tensors may be absent.

``read_checkpoint`` reads this much from a path without loading the tensors (a memory map, or a
sharded checkpoint's metadata), so that a bad ``ckpt_path`` is refused before the model is
touched; ``loaded_contents`` reads it from a checkpoint Lightning has loaded.
"""

from __future__ import annotations

import inspect
import pickle
import zipfile
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_peft.core.adapter import AdapterConfigLike
from lightning_peft.core.distributed import clean_name
from lightning_peft.core.errors import InputError
from lightning_peft.methods.registry import method_for

# Config fields that choose how the same adapters are computed, not which adapters exist.
IGNORED_FIELDS = ("backend",)
# Lightning's name for the non-tensor part of a distributed (sharded) checkpoint directory.
SHARDED_METADATA = "meta.pt"
SHARDED_PREFIX = "state_dict."


@dataclass
class CheckpointContents:
    """What a checkpoint says about the adapters it was trained with.

    Attributes:
        path: the checkpoint, for messages.
        peft_state: the callback's state (``method``, ``config``, ``random_states``), or None
            when the checkpoint was not written with ``PEFTCallback``.
        shapes: ``{key: shape}`` of the model tensors it holds (keys as in the
            LightningModule's ``state_dict()``), or None when they cannot be read (DeepSpeed).
    """

    path: str
    peft_state: dict[str, Any] | None
    shapes: dict[str, tuple[int, ...]] | None


def read_checkpoint(
    path: str | Path, state_key: str, other_directories: bool = False
) -> CheckpointContents | None:
    """The contents of the checkpoint at ``path``, read without loading its tensors.

    Args:
        path: a checkpoint file, or a sharded checkpoint directory (FSDP/FSDP2).
        state_key: the callback's key in ``checkpoint["callbacks"]``.
        other_directories: accept other directories (DeepSpeed's) without reading them.

    Returns:
        the contents, or None when they cannot be read safely: a file that pickles other
        objects than tensors and plain data (``torch.load(weights_only=True)`` refuses it), or
        a directory in another layout. Lightning loads such checkpoints itself; the callback
        then checks them in ``on_load_checkpoint``.

    Raises:
        InputError: the path does not exist, or is not a checkpoint that can be read
            (truncated, partially written, or another kind of file).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"ckpt_path {path} does not exist")
    if path.is_dir():
        return _read_sharded(path, state_key, other_directories)
    if not zipfile.is_zipfile(path):
        raise InputError(
            f"ckpt_path {path} is not a PyTorch checkpoint archive: a truncated or partially "
            "written file, or another kind of file"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError:
        return None  # other objects than tensors and plain data: Lightning loads it
    except Exception as error:
        raise InputError(f"ckpt_path {path} cannot be read ({error}): is it complete?") from error
    if not isinstance(checkpoint, dict):
        raise InputError(f"ckpt_path {path} holds a {type(checkpoint).__name__}, not a checkpoint")
    return loaded_contents(checkpoint, path, state_key)


def _read_sharded(path: Path, state_key: str, other_directories: bool) -> CheckpointContents | None:
    if not (path / ".metadata").is_file():
        if other_directories:
            return None
        raise InputError(
            f"ckpt_path {path} is a directory but not a sharded checkpoint (it has no .metadata)"
        )
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        meta = torch.load(path / SHARDED_METADATA, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return None
    except Exception as error:
        raise InputError(f"ckpt_path {path} cannot be read ({error}): is it complete?") from error
    shapes = {
        key.removeprefix(SHARDED_PREFIX): tuple(entry.size)
        for key, entry in metadata.items()
        if key.startswith(SHARDED_PREFIX) and hasattr(entry, "size")
    }
    return CheckpointContents(str(path), _peft_state(meta, state_key), shapes)


def loaded_contents(
    checkpoint: dict[str, Any], path: str | Path | None, state_key: str
) -> CheckpointContents:
    """The contents of a checkpoint Lightning has loaded (``on_load_checkpoint``'s argument).

    A sharded checkpoint's tensors are loaded in place and missing from ``checkpoint``: their
    keys and shapes come from the metadata at ``path``.
    """
    state_dict = checkpoint.get("state_dict")
    if isinstance(state_dict, dict):
        shapes = {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    elif path is not None and Path(path).is_dir() and (Path(path) / ".metadata").is_file():
        contents = _read_sharded(Path(path), state_key, other_directories=True)
        shapes = contents.shapes if contents is not None else None
    else:
        shapes = None
    return CheckpointContents(str(path), _peft_state(checkpoint, state_key), shapes)


def _peft_state(checkpoint: dict[str, Any], state_key: str) -> dict[str, Any] | None:
    state = (checkpoint.get("callbacks") or {}).get(state_key)
    return state if isinstance(state, dict) and "config" in state else None


def config_differences(
    method: str,
    saved: dict[str, Any],
    config: AdapterConfigLike,
    source: str = "the checkpoint",
) -> list[str]:
    """``"field: <saved> in <source>, <current> in this run"`` for each field that differs (the
    method alone if it differs; ``IGNORED_FIELDS`` skipped; a field the saved config lacks
    counts as its default)."""
    current_method = method_for(config).name
    if method != current_method:
        return [f"method: {method!r} in {source}, {current_method!r} in this run"]
    current = config.to_dict()
    defaults = _defaults(type(config))
    differences = []
    for name, value in current.items():
        if name in IGNORED_FIELDS:
            continue
        old = saved.get(name, defaults.get(name))
        if _plain(old) != _plain(value):
            differences.append(f"{name}: {old!r} in {source}, {value!r} in this run")
    differences += [
        f"{name}: {saved[name]!r} in {source}, not a field of {type(config).__name__}"
        for name in saved
        if name not in current and name not in IGNORED_FIELDS
    ]
    return differences


def check_config(contents: CheckpointContents, config: AdapterConfigLike, resuming: bool) -> None:
    """Raise ``InputError`` unless ``contents`` was written by the callback with ``config``.

    Only a run that resumes training needs the callback's state: validating or testing from a
    weights-only checkpoint, which records no callback, is fine (``check_tensors`` still
    requires the adapters)."""
    where = f"ckpt_path {contents.path}"
    if contents.peft_state is None:
        if not resuming:
            return
        raise InputError(
            f"{where} records no PEFTCallback state (written without the callback, or weights "
            "only): ckpt_path resumes a PEFT run, its optimizer included; to start from other "
            "weights, load them into the model before fit"
        )
    state = contents.peft_state
    differences = config_differences(state.get("method"), state["config"], config)
    if differences:
        raise InputError(
            f"{where} was trained with another adapter configuration: "
            + "; ".join(differences[:4])
            + (f"; and {len(differences) - 4} more" if len(differences) > 4 else "")
            + ". Resume with the checkpoint's configuration, or start a new run without ckpt_path"
        )


def check_tensors(
    contents: CheckpointContents,
    trained: dict[str, tuple[int, ...] | None],
    model_keys: set[str],
) -> None:
    """Raise ``InputError`` unless the checkpoint holds every tensor the run trains (with its
    shape, where ``trained`` gives one) and nothing the model lacks.

    Args:
        contents: the checkpoint's contents.
        trained: ``{key: shape or None}`` of the tensors the run trains and checkpoints.
        model_keys: every parameter and buffer name of the model.
    """
    if contents.shapes is None:
        return
    where = f"ckpt_path {contents.path}"
    missing = [key for key in trained if key not in contents.shapes]
    if missing:
        raise InputError(
            f"{where} lacks {len(missing)} of the {len(trained)} tensors this run trains "
            f"({_first(missing)}): it was trained on another model"
        )
    unexpected = sorted(set(contents.shapes) - model_keys)
    if unexpected:
        raise InputError(
            f"{where} holds {len(unexpected)} tensors this model does not have "
            f"({_first(unexpected)}): it was trained on another model"
        )
    for key, shape in trained.items():
        if shape is not None and contents.shapes[key] != shape:
            raise InputError(
                f"{where}: {key} has shape {contents.shapes[key]}, this model's has {shape}: "
                "it was trained on another model"
            )


def _first(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _defaults(config_type: type) -> dict[str, Any]:
    values = {}
    for f in fields(config_type):
        if f.default is not MISSING:
            values[f.name] = f.default
        elif f.default_factory is not MISSING:
            values[f.name] = f.default_factory()
    return values


def _plain(value: Any) -> Any:
    """Tuples as lists, so that a config compares equal across a save and load."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def checkpoint_paths(trainer: pl.Trainer) -> list[Path]:
    """The checkpoints this run wrote (its ``ModelCheckpoint`` callbacks') or resumed from."""
    paths = [trainer.ckpt_path] if trainer.ckpt_path else []
    for saver in trainer.checkpoint_callbacks:
        paths += [saver.last_model_path, saver.best_model_path, *saver.best_k_models]
    return [Path(p) for p in paths if p and "://" not in str(p)]


def warn_if_resumed_inside_a_finished_epoch(trainer: pl.Trainer, checkpoint: dict) -> None:
    """With ``max_steps`` set, Lightning 2.6 resumes a checkpoint written at the end of an epoch
    (its last batch done, the epoch not yet counted complete) inside that epoch: it trains one
    more batch there from a fresh iterator, and with ``max_epochs`` it then stops an epoch
    early."""
    fit_loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
    epochs = (fit_loop.get("epoch_progress") or {}).get("current") or {}
    last_batch = (fit_loop.get("epoch_loop.batch_progress") or {}).get("is_last_batch")
    if (
        trainer.max_steps != -1
        and last_batch
        and epochs.get("completed", 0) < epochs.get("processed", 0)
    ):
        rank_zero_warn(
            "PEFTCallback: this checkpoint ends an epoch and max_steps is set: Lightning then "
            "resumes inside the finished epoch and trains one more batch there (with max_epochs "
            "also set, it stops an epoch early). Bound the run with max_epochs alone for an "
            "exact continuation"
        )


def model_keys(pl_module: nn.Module) -> set[str]:
    """Every parameter and buffer name, as state dicts key them."""
    names = [n for n, _ in pl_module.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in pl_module.named_buffers(remove_duplicate=False)]
    return {clean_name(n) for n in names}


def requested_ckpt_path(trainer: pl.Trainer) -> str | None:
    """The ``ckpt_path`` the running ``fit``/``validate``/... will load, or None.

    Lightning resolves it before ``setup`` but keeps it in a local variable of
    ``Trainer._run`` until it loads the checkpoint, after ``setup``: read there, it lets the
    callback refuse a bad checkpoint before the model is touched. If it is not found there
    (another Lightning version), the same checks run in ``on_load_checkpoint``.
    """
    run_code = getattr(getattr(type(trainer), "_run", None), "__code__", None)
    frame = inspect.currentframe()
    try:
        while frame is not None:
            if frame.f_code is run_code and frame.f_locals.get("self") is trainer:
                path = frame.f_locals.get("ckpt_path")
                return None if path is None else str(path)
            frame = frame.f_back
    finally:
        del frame
    return None
