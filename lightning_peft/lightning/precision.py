"""Quantization under Lightning: a transformers model loaded 4-bit or 8-bit, and
``BitsandbytesPrecision``'s conversion done before adapters are injected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_peft.core.bnb import bitsandbytes_kind, import_bitsandbytes
from lightning_peft.core.errors import InputError
from lightning_peft.model.injection import modules_to_save_names

QUANTIZE_MODES = ("nf4", "fp4", "int8")


def check_quantize_mode(mode: str) -> None:
    """Raises ``InputError`` for a mode not in ``QUANTIZE_MODES``."""
    if mode not in QUANTIZE_MODES:
        raise InputError(f"quantize mode must be one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")


def bitsandbytes_config(
    mode: str, *, compute_dtype: torch.dtype = torch.float32, double_quant: bool = True
):
    """transformers' ``BitsAndBytesConfig`` for ``mode``.

    Args:
        mode: ``"nf4"`` / ``"fp4"`` (4-bit, QLoRA's nf4 by default) or ``"int8"`` (LLM.int8()).
        compute_dtype: the dtype 4-bit layers compute in (float32 on CPU, bfloat16 on GPUs).
        double_quant: quantize the 4-bit block scales too (QLoRA's double quantization).

    Raises:
        InputError: an unknown mode. MissingExtraError: bitsandbytes is not installed.
    """
    check_quantize_mode(mode)
    import_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=mode,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=double_quant,
    )


def load_quantized(
    model_dir: str | Path,
    mode: str,
    *,
    model_class: Any = None,
    compute_dtype: torch.dtype = torch.float32,
    double_quant: bool = True,
    device_map: str | dict = "cpu",
    **kwargs: Any,
) -> nn.Module:
    """A transformers model from ``model_dir`` with its linear layers quantized by bitsandbytes
    (the output layer stays float, as transformers decides), ready for ``inject_adapters``.

    Args:
        model_dir: a transformers model directory (nothing is downloaded).
        mode: ``"nf4"``, ``"fp4"`` or ``"int8"``.
        model_class: the ``AutoModel*`` class (default ``AutoModelForCausalLM``).
        compute_dtype, double_quant: as in ``bitsandbytes_config``.
        device_map: where the weights go (``"cpu"`` by default).
        kwargs: passed on to ``from_pretrained``.

    Raises:
        InputError: an unknown mode, or ``model_dir`` is not a directory.
        MissingExtraError: bitsandbytes is not installed.
    """
    quantization_config = bitsandbytes_config(
        mode, compute_dtype=compute_dtype, double_quant=double_quant
    )
    if not Path(model_dir).is_dir():
        raise InputError(f"model directory {str(model_dir)!r} does not exist")
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    return model_class.from_pretrained(
        str(model_dir),
        quantization_config=quantization_config,
        device_map=device_map,
        local_files_only=True,
        **kwargs,
    )


def quantize_for_precision(
    trainer: Any, pl_module: nn.Module, root: nn.Module, config: Any
) -> None:
    """Quantize ``pl_module`` as the trainer's ``BitsandbytesPrecision`` would, before adapters
    are injected into ``root`` (``pl_module`` or a submodule) with ``config``; nothing happens
    under any other precision.

    Lightning converts the model in strategy set-up, after callbacks' ``setup`` (where
    ``PEFTCallback`` injects): adapter layers are no ``nn.Linear`` and would keep float bases,
    and a bottleneck adapter's own ``nn.Linear`` would be swapped. So: the plugin's
    ``convert_module`` swaps the classes now, and moving each swapped layer to the strategy's
    device quantizes it. Lightning's later call finds bitsandbytes layers and only sets their
    compute dtype, so nothing injected afterwards is ever quantized. ``config.modules_to_save``
    (trained in full) stays float: it joins the plugin's ``ignore_modules`` for this conversion.

    Raises:
        ValueError: ``modules_to_save`` matches nothing, or the plugin quantized no layer (every
            ``nn.Linear`` ignored?), so adapters injected now would be quantized by Lightning's
            own conversion later. Nothing is converted then.
    """
    from lightning.pytorch.plugins import BitsandbytesPrecision

    plugin = trainer.precision_plugin
    if not isinstance(plugin, BitsandbytesPrecision):
        return
    if any(bitsandbytes_kind(m) for m in pl_module.modules()):
        return  # converted already (a second fit): Lightning converts once, too
    prefix = next(name for name, module in pl_module.named_modules() if module is root)
    keep_float = {f"{prefix}.{n}" if prefix else n for n in modules_to_save_names(root, config)}
    ignored = plugin.ignore_modules
    if not any(
        isinstance(m, nn.Linear) and not any(n.startswith(i) for i in ignored | keep_float)
        for n, m in pl_module.named_modules()
    ):
        raise ValueError(
            "BitsandbytesPrecision would quantize no layer of the model (are all its nn.Linear "
            f"layers in ignore_modules={sorted(ignored)} or modules_to_save?); adapters "
            "injected now would be quantized by Lightning later. Drop the plugin or quantize "
            "some layers"
        )
    plugin.ignore_modules = ignored | keep_float
    try:
        plugin.convert_module(pl_module)
    finally:
        plugin.ignore_modules = ignored
    device = trainer.strategy.root_device
    for module in pl_module.modules():
        if bitsandbytes_kind(module):
            module.to(device)  # bitsandbytes quantizes a layer's weight when it moves
