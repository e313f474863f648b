"""The random states a training run draws from, kept in checkpoints so that a resumed run draws
the same numbers as an uninterrupted one.

A run draws from: torch's CPU generator (dropout on the CPU, the dropout seeds of the
``peft_kernels`` ops, a shuffling ``RandomSampler`` without a generator of its own, DataLoader
worker seeds), the current CUDA device's generator (dropout on the GPU), numpy's and Python's
global generators (user code, augmentations), and any ``torch.Generator`` given to a training
DataLoader or its sampler. Lightning restores none of them from a checkpoint.

``PEFTCallback`` restores the process-wide states when Lightning loads the checkpoint, before the
training loop creates its first DataLoader iterator (which draws from them), and the DataLoaders'
own generators at ``on_train_start``, once the loaders exist (``restore_loaders``).

States are stored as tensors, ints and lists, which ``torch.load(weights_only=True)`` reads.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader

try:
    import numpy as np
except ImportError:  # numpy is optional for torch
    np = None


def capture(generators: Iterable[torch.Generator] = ()) -> dict[str, Any]:
    """This process's random states, and those of ``generators`` in order."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        # Only the current device's generator, and only if CUDA is in use: asking for all
        # devices would start a CUDA context on each of them.
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
        "python": _python_state(),
        "generators": [g.get_state() for g in generators],
    }
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, _words(keys.tolist()), pos, has_gauss, cached]
    return state


def restore(state: Mapping[str, Any]) -> list[str]:
    """Set the process-wide random states ``capture`` returned; returns what could not be."""
    torch.set_rng_state(state["torch"])
    skipped = []
    if state.get("cuda") is not None:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        else:
            skipped.append("the CUDA generator (no GPU in this run)")
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(_unwords(internal)), gauss_next))
    if np is not None and state.get("numpy") is not None:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        words = np.array(_unwords(keys), dtype=np.uint32)
        np.random.set_state((kind, words, pos, has_gauss, cached))
    return skipped


def restore_loaders(state: Mapping[str, Any], loaders: Any) -> list[str]:
    """Set the generators of the DataLoaders in ``loaders`` to the states ``capture`` saved
    (``capture(loader_generators(loaders))``), for loaders whose current iterator was created
    before this call; returns what could not be restored.

    A DataLoader iterator draws its base seed (one int64) from the DataLoader's generator when
    it is created, and its sampler draws from its generator on the first batch. Lightning
    creates the first epoch's iterator before ``on_train_start``, where the callback calls
    this: the base-seed draw is replayed after the restore, so that the sampler draws what it
    drew in the uninterrupted run. (The workers' seeds of that first iterator come from the
    generator before the restore.)
    """
    generators = loader_generators(loaders)
    saved = state.get("generators", [])
    if len(saved) != len(generators):
        return [f"the training DataLoaders' generators ({len(saved)} saved, {len(generators)} now)"]
    for generator, generator_state in zip(generators, saved, strict=True):
        generator.set_state(generator_state)
    for loader in _flatten(loaders):
        if isinstance(loader.generator, torch.Generator):
            torch.empty((), dtype=torch.int64).random_(generator=loader.generator)
    return []


def loader_generators(loaders: Any) -> list[torch.Generator]:
    """The distinct ``torch.Generator`` objects of the DataLoaders in ``loaders`` (a DataLoader,
    or a list/dict of them, as ``trainer.train_dataloader``): their own, their sampler's and
    their batch sampler's sampler's."""
    found: dict[int, torch.Generator] = {}
    for loader in _flatten(loaders):
        batch_sampler = getattr(loader, "batch_sampler", None)
        candidates = [
            getattr(loader, "generator", None),
            getattr(getattr(loader, "sampler", None), "generator", None),
            getattr(getattr(batch_sampler, "sampler", None), "generator", None),
        ]
        for generator in candidates:
            if isinstance(generator, torch.Generator):
                found.setdefault(id(generator), generator)
    return list(found.values())


def _flatten(loaders: Any) -> list[DataLoader]:
    if isinstance(loaders, DataLoader):
        return [loaders]
    if isinstance(loaders, Mapping):
        return [d for value in loaders.values() for d in _flatten(value)]
    if isinstance(loaders, (list, tuple)):
        return [d for value in loaders for d in _flatten(value)]
    return []


def _python_state() -> list:
    version, internal, gauss_next = random.getstate()
    return [version, _words(internal), gauss_next]


def _words(values) -> torch.Tensor:
    """Mersenne-Twister words (uint32) as an int32 tensor, compact in a checkpoint."""
    return torch.tensor(values, dtype=torch.int64).to(torch.int32)


def _unwords(words: torch.Tensor) -> list[int]:
    return (words.to(torch.int64) & 0xFFFFFFFF).tolist()
