"""``combine_adapter_dirs``: peft's ``add_weighted_adapter`` on adapter directories, without a
model: read LoRA adapters in the PEFT format (written here or by peft), combine them
(``lightning_peft.model.weighted``), write the new adapter as a PEFT directory that peft and
``load_adapter`` load. The module docstrings of ``model.combine`` and ``model.weighted`` give the
math, what equals peft bit for bit, and what is refused.

Without the model, sites are combined in name order (``layers.2`` before ``layers.10``), not the
model's module order: dare_* masks then differ from peft's even from the same RNG state (the
deterministic combinations do not depend on the order).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from lightning_peft.methods.lora.config import LoRAConfig
from lightning_peft.methods.lora.method import lora_config_data
from lightning_peft.model.combine import Part
from lightning_peft.model.weighted import Source, combine, plan_combination
from lightning_peft.peft_format.files import (
    PREFIX,
    _write_atomically,
    check_save_directory,
    read_config,
    read_weights,
)

# (suffix of A, suffix of B) in a PEFT file: linear and convolution layers, embeddings.
FACTOR_SUFFIXES = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"))


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def read_source(directory: str | Path, name: str | None = None) -> tuple[Source, dict]:
    """(``Source`` of the adapter in ``directory``, ``{site: (A suffix, B suffix)}``).

    Raises:
        ValueError: not a LoRA adapter, or a tensor that is not a factor (DoRA's magnitude,
            B's bias, a module trained in full: refused by ``check_sources`` with the reason).
    """
    directory = Path(directory)
    config = read_config(directory)
    path, tensors = read_weights(directory)
    name = name or directory.name
    factors: dict[str, dict[str, Tensor]] = {}
    suffixes = {}
    for key, tensor in tensors.items():
        module = key.removeprefix(PREFIX)
        for pair in FACTOR_SUFFIXES:
            for part, suffix in zip("AB", pair, strict=True):
                if module.endswith(suffix):
                    site = module.removesuffix(suffix)
                    factors.setdefault(site, {})[part] = tensor
                    suffixes[site] = pair
    parts = {}
    for site, found in sorted(factors.items(), key=lambda item: _natural(item[0])):
        if set(found) != {"A", "B"}:
            raise ValueError(f"{path}: {site!r} lacks lora_A or lora_B")
        scaling = 1.0
        if isinstance(config, LoRAConfig):
            scaling = config.scaling_for(*config.rank_and_alpha(site))
        parts[site] = Part(found["A"], found["B"], scaling)
    return Source(name, config, parts), suffixes


def combine_adapter_dirs(
    directories: Sequence[str | Path],
    weights: Sequence[float],
    output_dir: str | Path,
    combination_type: str = "svd",
    *,
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    density: float | None = None,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
    overwrite: bool = False,
) -> Path:
    """Combine the LoRA adapters in ``directories`` with ``weights`` into a new adapter written
    to ``output_dir`` (peft's combinations and options; see ``add_weighted_adapter``).

    Returns:
        ``output_dir``.

    Raises:
        ValueError / FileNotFoundError: a directory that is not a LoRA adapter, an adapter that
            cannot be combined, bad options (each named); FileExistsError: ``output_dir``
            holds an adapter and ``overwrite`` is False. Nothing is written then.
    """
    output_dir = check_save_directory(output_dir, overwrite)
    read = [read_source(d) for d in directories]
    labels = [str(d) for d in directories]
    sources = [Source(label, s.config, s.parts) for label, (s, _) in zip(labels, read, strict=True)]
    plan = plan_combination(
        sources,
        weights,
        combination_type,
        svd_rank=svd_rank,
        svd_clamp=svd_clamp,
        svd_full_matrices=svd_full_matrices,
        density=density,
        majority_sign_method=majority_sign_method,
    )
    dtype = next(iter(sources[0].parts.values())).lora_A.dtype
    tensors = {}
    for site, (lora_A, lora_B) in combine(plan, sources, weights, generator).items():
        suffix_A, suffix_B = next(sfx[site] for _, sfx in read if site in sfx)
        tensors[PREFIX + site + suffix_A] = lora_A.to(dtype).contiguous()
        tensors[PREFIX + site + suffix_B] = lora_B.to(dtype).contiguous()
    first = sources[0].config
    config = lora_config_data(
        plan.config,
        plan.sites,
        first.base_model_name_or_path,
        bool(getattr(first, "fan_in_fan_out", False)),
    )
    _write_atomically(output_dir, tensors, config)
    return output_dir
