"""Adapters in the Hugging Face PEFT format: ``adapter_config.json`` and the weights file
``adapter_model.safetensors``.

Key mapping (``<p>`` a module path in the injected model):

=================================  ====================================================
here                               PEFT file
=================================  ====================================================
``<p>.lora_A`` / ``<p>.lora_B``    ``base_model.model.<p>.lora_A.weight`` / ``.lora_B.weight``
``<p>.lora_magnitude`` (DoRA)      ``base_model.model.<p>.lora_magnitude_vector``
``<p>.bias`` of an adapted layer   ``base_model.model.<p>.base_layer.bias``
any other saved tensor ``<k>``     ``base_model.model.<k>`` (modules_to_save, other biases)
=================================  ====================================================

Bottleneck adapters have no PEFT counterpart: they are written in the same layout with
``"peft_type": "LIGHTNING_BOTTLENECK"``, which only this package reads.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lightning_peft.config import AdapterConfig, LoRAConfig
from lightning_peft.injection import find_injection, inject_adapters, modules_to_save_names
from lightning_peft.lora_layer import LoRALinear
from lightning_peft.model_helpers import adapter_state_dict
from lightning_peft.targeting import select_targets

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
BOTTLENECK_TYPE = "LIGHTNING_BOTTLENECK"
# peft fields that change the math; any other value than these defaults cannot be loaded here.
_UNSUPPORTED_PEFT_FIELDS = {
    "lora_bias": False,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_qalora": False,
    "use_bdlora": None,
}
_PEFT_LORA_FIELDS = (
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "bias",
    "use_rslora",
    "use_dora",
    "init_lora_weights",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
)


def _peft_key(model: nn.Module, key: str) -> str:
    module_name, _, param = key.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(module, LoRALinear):
        if param in ("lora_A", "lora_B"):
            return f"{PREFIX}{module_name}.{param}.weight"
        if param == "lora_magnitude":
            return f"{PREFIX}{module_name}.lora_magnitude_vector"
        if param == "bias":
            return f"{PREFIX}{module_name}.base_layer.bias"
    return PREFIX + key


def _config_json(model: nn.Module, config: LoRAConfig | AdapterConfig, targets: list[str]) -> dict:
    if isinstance(config, AdapterConfig):
        return {"peft_type": BOTTLENECK_TYPE, **config.to_dict(), "target_modules": targets}
    name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    data = {name: getattr(config, name) for name in _PEFT_LORA_FIELDS}
    data.update(
        peft_type="LORA",
        task_type=None,
        inference_mode=True,
        base_model_name_or_path=name_or_path,
        # The exact modules adapted: peft matches a listed full name directly.
        target_modules=targets,
        layers_to_transform=None,
        layers_pattern=None,
        fan_in_fan_out=any(
            model.get_submodule(t).fan_in_fan_out
            for t in targets
            if isinstance(model.get_submodule(t), LoRALinear)
        ),
    )
    return data


def save_adapter(
    model: nn.Module, directory: str | Path, state_dict: Mapping[str, Tensor] | None = None
) -> Path:
    """Write the adapters of ``model`` to ``directory`` in the Hugging Face PEFT format.

    ``peft.PeftModel.from_pretrained(base_model, directory)`` loads the result (LoRA, rsLoRA,
    DoRA). ``model`` may be the injected model or any module above it (a LightningModule).

    Args:
        model: the injected model, or a parent of it.
        directory: where to write; created if needed.
        state_dict: full tensors keyed as ``model.state_dict()`` (e.g. gathered from the ranks
            of a sharded model); by default the model's own tensors.

    Returns:
        the directory.
    """
    found = find_injection(model)
    if found is None:
        raise ValueError("the model has no adapters to save (inject_adapters was not called on it)")
    prefix, root, state = found
    prefix = f"{prefix}." if prefix else ""
    tensors = {}
    for key, tensor in adapter_state_dict(root).items():
        if state_dict is not None:
            tensor = state_dict[prefix + key]
        tensors[_peft_key(root, key)] = tensor.detach().contiguous().cpu()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    config = _config_json(root, state.config, state.targets)
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def read_config(directory: Path) -> LoRAConfig | AdapterConfig:
    """The config of an adapter directory (written here or by ``peft``)."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not an adapter directory")
    data = json.loads(path.read_text())
    peft_type = data.get("peft_type")
    if peft_type == BOTTLENECK_TYPE:
        names = {f.name for f in fields(AdapterConfig)}
        return AdapterConfig(**{k: v for k, v in data.items() if k in names})
    if peft_type != "LORA":
        raise ValueError(
            f"{path}: unknown adapter method peft_type={peft_type!r}; this package loads LORA "
            f"(LoRA, rsLoRA, DoRA) and {BOTTLENECK_TYPE}"
        )
    for name, default in _UNSUPPORTED_PEFT_FIELDS.items():
        if data.get(name, default) not in (default, [], {}):
            raise ValueError(f"{path}: {name}={data[name]!r} is not supported here")
    kwargs = {k: data[k] for k in _PEFT_LORA_FIELDS if k in data and data[k] is not None}
    kwargs.setdefault("target_modules", data.get("target_modules"))
    init = kwargs.get("init_lora_weights", True)
    if not (isinstance(init, bool) or init in ("gaussian", "pissa")):
        kwargs["init_lora_weights"] = True  # other inits only set the starting point
    return LoRAConfig(**kwargs)


def _expected_shapes(model: nn.Module, config: LoRAConfig | AdapterConfig) -> dict:
    """{PEFT key: shape} that an adapter for ``config`` on the (not yet injected) ``model``
    holds: the same keys ``save_adapter`` writes after ``inject_adapters(model, config)``."""
    from lightning_peft.bottleneck import CHILD_NAME, output_features

    targets = select_targets(model, config)
    shapes: dict[str, tuple[int, ...]] = {}
    lora_targets = set()
    for name in targets:
        module = model.get_submodule(name)
        if isinstance(config, AdapterConfig):
            features, hidden = output_features(module), config.bottleneck_dim
            base = f"{PREFIX}{name}.{CHILD_NAME}"
            shapes |= {
                f"{base}.down.weight": (hidden, features),
                f"{base}.down.bias": (hidden,),
                f"{base}.up.weight": (features, hidden),
                f"{base}.up.bias": (features,),
            }
            continue
        lora_targets.add(name)
        rank, _ = config.rank_and_alpha(name)
        out_f, in_f = module.weight.shape[::-1] if hasattr(module, "nf") else module.weight.shape
        shapes[f"{PREFIX}{name}.lora_A.weight"] = (rank, in_f)
        shapes[f"{PREFIX}{name}.lora_B.weight"] = (out_f, rank)
        if config.use_dora:
            shapes[f"{PREFIX}{name}.lora_magnitude_vector"] = (out_f,)
    for name in modules_to_save_names(model, config):
        for param_name, param in model.get_submodule(name).named_parameters():
            shapes[f"{PREFIX}{name}.{param_name}"] = tuple(param.shape)
    if config.bias != "none":
        for param_name, param in model.named_parameters():
            module_name = param_name.rpartition(".")[0]
            adapted = any(module_name == t or module_name.startswith(f"{t}.") for t in targets)
            if not param_name.endswith("bias") or (config.bias == "lora_only" and not adapted):
                continue
            if module_name in lora_targets:
                shapes[f"{PREFIX}{module_name}.base_layer.bias"] = tuple(param.shape)
            else:
                shapes[PREFIX + param_name] = tuple(param.shape)
    return shapes


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Inject and load the adapter in ``directory`` (written here or by ``peft``) into ``model``.

    Everything is checked before the model is touched: a directory that does not fit (missing
    or unexpected keys, wrong shapes, an unknown method) raises naming the first mismatch and
    leaves the model exactly as it was. Returns ``model``.
    """
    directory = Path(directory)
    config = read_config(directory)
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} does not exist")
    tensors = load_file(weights_path)
    expected = _expected_shapes(model, config)
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

    inject_adapters(model, config)  # pissa turns W into its residual here, as peft does
    targets = {_peft_key(model, key): value for key, value in adapter_state_dict(model).items()}
    with torch.no_grad():
        for key, value in tensors.items():
            targets[key].copy_(value.to(targets[key].dtype))
    return model
