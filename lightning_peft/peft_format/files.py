"""Adapters in the Hugging Face PEFT format: ``adapter_config.json`` and the weights file
``adapter_model.safetensors`` (written here), or peft's older ``adapter_model.bin`` (read only).

Keys: every saved tensor ``<k>`` (a model state-dict key) is written as
``base_model.model.<k>``, except the tensors of an adapter layer at path ``<p>``, written as
``base_model.model.<p>.<suffix>`` with the suffix its class declares (``saved_names``), e.g. for
LoRA:

=================================  ====================================================
here                               PEFT file
=================================  ====================================================
``<p>.lora_A`` / ``<p>.lora_B``    ``base_model.model.<p>.lora_A.weight`` / ``.lora_B.weight``
``<p>.lora_magnitude`` (DoRA)      ``base_model.model.<p>.lora_magnitude_vector``
``<p>.bias`` of an adapted layer   ``base_model.model.<p>.base_layer.bias``
=================================  ====================================================

The same declarations give the keys and shapes a directory must hold before anything is
injected (``planned_tensors``), so a load checks the whole file before touching the model.
A tensor the model holds in two places (a module in two containers) is written once, under its
first name, as peft writes it. Bottleneck adapters have no PEFT counterpart: they are written in
the same layout with ``"peft_type": "LIGHTNING_BOTTLENECK"``, which only this package reads.

``adapter_model.bin`` (peft's ``save_pretrained(..., safe_serialization=False)``) is a pickle.
It is read as peft reads it, with ``torch.load(weights_only=True)``: that unpickler builds tensors
and plain containers only and refuses anything else before running it, so a file carrying code
is refused, not run; what it returns must be a dict of str -> Tensor. When a directory holds
both files the safetensors one is read, as peft reads it.

Writes are atomic per file: both files go to temporary names first, an existing config is
removed before the new weights replace the old ones, and the config (what makes a directory an
adapter) is renamed into place last. An interrupted save leaves the old adapter, or a directory
without ``adapter_config.json``, never new weights under an old config.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lightning_peft.core.adapter import PEFT_PREFIX, AdapterLayer
from lightning_peft.core.distributed import clean_name
from lightning_peft.core.errors import NonFiniteError
from lightning_peft.core.finite import non_finite_tensors
from lightning_peft.methods.bottleneck.layers import BOTTLENECK_TYPE
from lightning_peft.methods.registry import METHODS, method_for, method_for_peft_type
from lightning_peft.model.helpers import adapter_state_dict
from lightning_peft.model.injection import (
    find_adapters,
    find_injection,
    inject_adapters,
    planned_tensors,
)
from lightning_peft.model.named import checked_names
from lightning_peft.model.sites import DEFAULT_NAME, site_path_of

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"  # peft's older format, read only
PREFIX = PEFT_PREFIX
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME)
__all__ = [
    "BOTTLENECK_TYPE",
    "CONFIG_NAME",
    "PREFIX",
    "WEIGHTS_NAME",
    "adapter_directory",
    "check_save_directory",
    "load_adapter",
    "peft_key",
    "peft_keys",
    "read_config",
    "read_weights",
    "save_adapter",
]


def peft_key(model: nn.Module, key: str) -> str:
    """The PEFT-file key of the state-dict key ``key`` (relative to the injected ``model``)."""
    return peft_keys(model, [key])[key]


def peft_keys(model: nn.Module, keys) -> dict[str, str]:
    """``{key: PEFT-file key}``: a tensor ``<p>.<name>`` of the adapter layer at ``<p>`` is
    written as its class's ``peft_key(<p>, name)``, anything else as ``<prefix><key>`` with the
    method's ``file_prefix`` (``base_model.model.``; prompt learning ``base_model.``)."""
    found = find_injection(model)
    prefix = method_for(found[2].config).file_prefix if found is not None else PEFT_PREFIX
    layers = {
        clean_name(path): (type(module), clean_name(site_path_of(path)))
        for path, module in model.named_modules(remove_duplicate=False)
        if isinstance(module, AdapterLayer)
    }
    out = {}
    for key in keys:
        owner, _, local = key.rpartition(".")
        layer_class, site = layers.get(owner, (None, owner))
        # a named adapter's tensors are keyed at its site, without its name (peft's files)
        out[key] = layer_class.peft_key(site, local) if layer_class is not None else prefix + key
    return out


def check_save_directory(directory: str | Path, overwrite: bool = False) -> Path:
    """Check that ``save_adapter`` can write to ``directory``, before any work is done.

    A missing or empty directory, or one without an adapter in it, is fine (it is created; other
    files in it are left alone). One that holds an adapter (``adapter_config.json`` or
    ``adapter_model.safetensors``) needs ``overwrite=True``.

    Raises:
        FileExistsError: an adapter is there and ``overwrite`` is False, or the path is a file.
        NotADirectoryError: the nearest existing parent is a file.
        PermissionError: the directory (or the nearest existing parent) is not writable.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} is a file, not an adapter directory")
    existing = [name for name in ADAPTER_FILES if (directory / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{directory} already holds an adapter ({existing[0]}); pass overwrite=True to "
            "replace it, or choose another directory"
        )
    nearest = directory
    while not nearest.exists():
        nearest = nearest.parent
    if not nearest.is_dir():
        raise NotADirectoryError(f"cannot create {directory}: {nearest} is a file")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write to {directory}: {nearest} is not writable")
    return directory


def _without_aliases(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """safetensors refuses tensors that share memory (views of one storage, e.g. FSDP1's flat
    parameters): clone all but the first of each group, as peft does."""
    seen: set[tuple] = set()
    out = {}
    for key, tensor in tensors.items():
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        out[key] = tensor.clone() if storage in seen else tensor
        seen.add(storage)
    return out


def adapter_directory(directory: str | Path, name: str) -> Path:
    """Where ``save_adapter`` writes the adapter ``name`` under ``directory`` (peft's layout):
    ``directory`` itself for ``"default"``, ``directory/<name>`` for any other."""
    return Path(directory) if name == DEFAULT_NAME else Path(directory) / name


def save_adapter(
    model: nn.Module,
    directory: str | Path,
    state_dict: Mapping[str, Tensor] | None = None,
    *,
    names: str | list[str] | None = None,
    overwrite: bool = False,
    allow_non_finite: bool = False,
) -> Path:
    """Write the adapters of ``model`` to ``directory`` in the Hugging Face PEFT format.

    ``peft.PeftModel.from_pretrained(base_model, directory)`` loads the result (LoRA, rsLoRA,
    DoRA). ``model`` may be the injected model or any module above it (a LightningModule).
    Named adapters go where peft's ``save_pretrained`` puts them: ``default`` at ``directory``,
    every other at ``directory/<name>/`` (``adapter_directory``), each with its own
    ``adapter_config.json`` and weights keyed without the name.

    Args:
        model: the injected model, or a parent of it.
        directory: where to write; created if needed.
        state_dict: full tensors keyed as ``model.state_dict()`` (e.g. gathered from the ranks
            of a sharded model); by default the model's own tensors.
        names: the adapters to write (one name or a list); None: all of them.
        overwrite: replace an adapter already in a target directory (by default that is an
            error, raised before anything is written).
        allow_non_finite: write tensors that hold NaN or infinity (by default refused, before
            anything is written: such an adapter is the trace of a diverged run).

    Returns:
        the directory.

    Raises:
        ValueError: the model has no adapters, or no adapter of a name given. NonFiniteError
        (a ``ValueError``): a tensor holds NaN or infinity, named with the count.
        FileExistsError / PermissionError: see ``check_save_directory``. Nothing is written
        then.
    """
    found = find_adapters(model)
    if found is None:
        raise ValueError("the model has no adapters to save (inject_adapters was not called on it)")
    prefix, root, adapters = found
    prefix = f"{prefix}." if prefix else ""
    chosen = list(adapters.states) if names is None else checked_names(root, names)
    writes = []  # (directory, tensors, config) of each adapter, all checked before any write
    for name in chosen:
        target = check_save_directory(adapter_directory(directory, name), overwrite)
        state = adapters.states[name]
        live = adapter_state_dict(root, name)
        keys = peft_keys(root, live)
        tensors = {}
        for key, tensor in live.items():
            if state_dict is not None:
                tensor = state_dict[prefix + key]
            tensors[keys[key]] = tensor.detach().contiguous().cpu()
        if not allow_non_finite:
            _refuse_non_finite(target, tensors)
        config = method_for(state.config).write_config(root, state.config, state.targets)
        writes.append((target, _without_aliases(tensors), config))
    for target, tensors, config in writes:
        _write_atomically(target, tensors, config)
    return Path(directory)


def _refuse_non_finite(directory: Path, tensors: dict[str, Tensor]) -> None:
    found = non_finite_tensors(tensors)
    if not found:
        return
    name, bad, size = found[0]
    others = f" (and {len(found) - 1} more of the {len(tensors)} tensors)" if len(found) > 1 else ""
    detail = f"{name} holds {bad:,} NaN or infinite values of {size:,}{others}"
    error = NonFiniteError(
        f"refusing to write a non-finite adapter to {directory}: {detail}; pass "
        "allow_non_finite=True to write it anyway"
    )
    error.detail = detail
    raise error


def _write_atomically(directory: Path, tensors: dict[str, Tensor], config: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    suffix = f".tmp-{os.getpid()}"
    weights_tmp = directory / f".{WEIGHTS_NAME}{suffix}"
    config_tmp = directory / f".{CONFIG_NAME}{suffix}"
    try:
        save_file(tensors, weights_tmp, metadata={"format": "pt"})
        config_tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (directory / CONFIG_NAME).unlink(missing_ok=True)  # no old config over new weights
        os.replace(weights_tmp, directory / WEIGHTS_NAME)
        os.replace(config_tmp, directory / CONFIG_NAME)
    finally:
        weights_tmp.unlink(missing_ok=True)
        config_tmp.unlink(missing_ok=True)


def read_config(directory: str | Path):
    """The config of an adapter directory (written here or by ``peft``).

    Raises:
        FileNotFoundError: no ``adapter_config.json``.
        ValueError: the file is not a JSON object, names an unknown method, or asks for
            something this package cannot load with peft's numbers (each named).
    """
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not an adapter directory")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got a JSON {type(data).__name__}")
    peft_type = data.get("peft_type")
    method = method_for_peft_type(peft_type)
    if method is None:
        known = ", ".join(m.peft_type for m in METHODS)
        raise ValueError(
            f"{path}: unknown adapter method peft_type={peft_type!r}; this package loads {known}"
        )
    return method.read_config(data, path)


def _listing(directory: Path, shown: int = 8) -> str:
    names = sorted(p.name + "/" * p.is_dir() for p in directory.iterdir())
    if not names:
        return "it is empty"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return "it holds " + ", ".join(names[:shown]) + more


def _torch_load_reason(error: Exception) -> str:
    """What ``torch.load(weights_only=True)`` objected to, without its generic advice."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    generic = ("Weights only load failed", "Please file an issue", "Check the documentation")
    reason = [line for line in lines if not line.startswith(generic)]
    return " ".join(reason or lines[:1])


def _read_pickle_weights(path: Path) -> dict[str, Tensor]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any failure to read is the file's
        reason = _torch_load_reason(error)
        if "GLOBAL" in reason:  # an object that is not a tensor or a plain container
            raise ValueError(
                f"{path} was not loaded: it holds objects other than tensors ({reason}); nothing "
                "in it was run. peft writes only tensors there: save the adapter again with "
                "peft's save_pretrained (adapter_model.safetensors) from a source you trust"
            ) from None
        raise ValueError(
            f"{path} is not a readable torch.save file: {type(error).__name__}: {reason}"
        ) from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a dict of tensors")
    for key, value in loaded.items():
        if not isinstance(key, str):
            what = f"the key {key!r} (of type {type(key).__name__}) is not a name"
        elif not isinstance(value, Tensor):
            what = f"{key!r} is of type {type(value).__name__}, not a tensor"
        else:
            continue
        raise ValueError(f"{path}: {what}; an adapter file holds only tensors, keyed by name")
    return loaded


def read_weights(directory: str | Path) -> tuple[Path, dict[str, Tensor]]:
    """(the file read, its tensors) of an adapter directory: ``adapter_model.safetensors``, else
    peft's older ``adapter_model.bin`` (read with ``torch.load(weights_only=True)``, as peft
    reads it: a file carrying code is refused without running it).

    Raises:
        FileNotFoundError: neither file is there (the message says what the directory holds).
        ValueError: the file cannot be read, or holds anything but a dict of str -> Tensor.
    """
    directory = Path(directory)
    path = directory / WEIGHTS_NAME
    if path.is_file():
        try:
            return path, load_file(path)
        except SafetensorError as error:
            raise ValueError(f"{path} is not a readable safetensors file: {error}") from None
    path = directory / PICKLE_WEIGHTS_NAME
    if path.is_file():
        return path, _read_pickle_weights(path)
    raise FileNotFoundError(
        f"{directory} has no {WEIGHTS_NAME} or {PICKLE_WEIGHTS_NAME} ({_listing(directory)})"
    )


def load_adapter(model: nn.Module, directory: str | Path, name: str = DEFAULT_NAME) -> nn.Module:
    """Inject and load the adapter in ``directory`` (written here or by ``peft``; the weights in
    ``adapter_model.safetensors`` or peft's older ``adapter_model.bin``, see ``read_weights``)
    into ``model`` as the adapter ``name`` (beside the model's adapters, if it has some: see
    ``inject_adapters``; peft's ``load_adapter(directory, adapter_name=name)``).

    Everything is checked before the model is touched: a directory that does not fit (missing
    or unexpected keys, wrong shapes, an unknown method) raises naming the first mismatch and
    leaves the model exactly as it was. Returns ``model``.
    """
    directory = Path(directory)
    config = read_config(directory)
    weights_path, tensors = read_weights(directory)
    expected = planned_tensors(model, config, name)
    for key, shape in expected.items():
        if key not in tensors:
            raise ValueError(f"{weights_path}: missing key {key!r} (expected shape {shape})")
        if tuple(tensors[key].shape) != shape:
            raise ValueError(
                f"{weights_path}: {key!r} has shape {tuple(tensors[key].shape)}, "
                f"the model needs {shape}"
            )
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ValueError(f"{weights_path}: unexpected key {unexpected[0]!r} for this model")

    inject_adapters(model, config, name)  # pissa/olora turn W into its residual, as in peft
    live = adapter_state_dict(model, name)
    names = peft_keys(model, live)
    targets = {names[key]: value for key, value in live.items()}
    with torch.no_grad():
        for key, value in tensors.items():
            targets[key].copy_(value.to(targets[key].dtype))
    return model
