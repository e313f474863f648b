"""Mixed-adapter batches: row i of a batch runs the adapter ``adapter_names[i]`` (``"__base__"``:
none), as peft's ``model(..., adapter_names=[...])``, in forward, ``generate`` and training.

``with mixed_batch(model, adapter_names):`` routes every adapter site to ``mixed_route`` for the
block. Rows are the first dimension of each adapted layer's input ((B, T, in) or (B, in); ids
(B, T) for an embedding). A site without adapter X runs X's rows as the base. LoRA/rsLoRA on
linear layers run ONE op per layer (``LoRALinear.mixed_output``: the base product, then
``peft_kernels.grouped_lora_delta`` over the rows sorted by adapter, scattered back); the
grouping (the sorted rows and group ends) is computed once per batch, per distinct set of
adapters at a site and per row count (decoding changes T), and cached in the batch. Other layer
types (LoRA convolutions and embeddings, ``lora_bias``, IA³) loop over the adapters present:
gather the rows, run the site with that adapter, scatter them back.

Refused by name before any layer runs: a name the model does not have, DoRA adapters (peft
refuses them in mixed batches too), merged adapters (peft refuses), layers that hold one adapter
(``nn.MultiheadAttention``, a quantized base), a mixed batch inside another. A layer whose input
has another number of rows than ``adapter_names`` raises naming the layer (beam search: repeat
each name ``num_beams`` times, as peft's ``generate`` does).

The keyword: a model with two adapters or more gets a forward pre-hook on its injected root
that pops ``adapter_names`` from the call's keywords and runs that call in ``mixed_batch``
(transformers' models do not pass extra keywords down to their linear layers), and a
``generate`` of its own (a method bound to the instance) that pops it and runs the whole
generation in ``mixed_batch``, each name repeated ``num_beams`` times with beam search, as
peft's ``generate`` does (transformers' ``generate`` refuses keywords its model's forward does
not name).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_peft.core.adapter import AdapterLayer
from lightning_peft.model.injection import find_adapters
from lightning_peft.model.named import checked_names
from lightning_peft.model.sites import BASE_ROWS, site_layers, sites
from peft_kernels import RowGroups

MIXED_ATTR = "mixed_batch_state"
_KEYWORD_HANDLES = "_adapter_names_keyword_handles"


@dataclass
class MixedBatch:
    """One mixed batch: the name of each row, the distinct adapters in it, and the groupings
    computed so far."""

    names: list[str]
    adapters: list[str]  # distinct, in order of first appearance, "__base__" left out
    index: Tensor  # (B,) int64: position in ``adapters``, -1 for a base row
    position: dict[str, int]  # adapter name -> its position in ``adapters``
    paths: dict[int, str]  # id(site) -> path, for messages
    _groupings: dict[tuple, tuple[RowGroups, Tensor]] = field(default_factory=dict)

    def grouping(self, present: tuple[int, ...], n_rows: int, device) -> tuple[RowGroups, Tensor]:
        """``(groups, local (N,))`` for a site holding the adapters at the positions ``present``
        (K of them, in that order) and an input of ``n_rows`` flattened rows (B·T): every
        flattened row sorted by its adapter there (stable; rows of no adapter last, past
        ``offsets[-1]``; ``rows`` None when the batch is in that order already: no gather, no
        scatter, e.g. one adapter, or rows spread evenly in order), and each flattened row's
        local adapter (-1: none). Made (and checked) once per (present, n_rows, device) for
        every layer of the batch; the order is read on the (B,) host index."""
        key = (present, n_rows, device)
        found = self._groupings.get(key)
        if found is not None:
            return found
        to_local = torch.full((len(self.adapters) + 1,), -1, dtype=torch.int64)
        to_local[list(present)] = torch.arange(len(present))
        per_row = to_local[self.index]  # (B,) on the host; index -1 reads the last entry: -1
        order = torch.where(per_row < 0, len(present), per_row)
        in_order = bool((order[1:] >= order[:-1]).all())
        local = per_row.to(device).repeat_interleave(n_rows // len(self.names))
        group = torch.where(local < 0, len(present), local)
        rows = None if in_order else torch.sort(group, stable=True).indices
        counts = torch.bincount(group, minlength=len(present) + 1)
        found = (RowGroups(counts[: len(present)].cumsum(0), rows, n_rows), local)
        self._groupings[key] = found
        return found

    def rows_of(self, position: int, device) -> Tensor:
        """The batch rows (B,) that run the adapter at ``position``."""
        return (self.index == position).nonzero().flatten().to(device)


def _refusal(all_sites: list[tuple[str, AdapterLayer]], names: list[str]) -> str | None:
    for path, site in all_sites:
        if not type(site).supports_named:
            return (
                f"{type(site).__name__} at {path!r} holds one adapter and cannot route a mixed "
                "batch; mixed batches need layers that hold named adapters"
            )
        for layer in site_layers(site):
            if layer.adapter_name not in names:
                continue
            if layer.merged:
                return (
                    f"adapter {layer.adapter_name!r} is merged into the weights at {path!r}; "
                    "a mixed batch needs unmerged adapters (peft refuses too): call "
                    "unmerge_adapters(model) first"
                )
            if getattr(layer, "use_dora", False):
                return (
                    f"adapter {layer.adapter_name!r} is DoRA (at {path!r}); DoRA adapters cannot "
                    "run in a mixed batch (peft refuses them too): run their rows in a batch of "
                    "their own"
                )
        if site.router is mixed_route:
            return "a mixed batch is already running on this model; mixed batches do not nest"
    return None


@contextmanager
def mixed_batch(model: nn.Module, adapter_names: list[str]) -> Iterator[nn.Module]:
    """Inside the block, row i of every batch runs the adapter ``adapter_names[i]``
    (``"__base__"``: the base model), whatever the active adapters; gradients reach each
    adapter from its own rows only.

    Raises:
        ValueError: no adapters, an empty list, a name the model does not have, a DoRA or
            merged adapter named, a layer that holds one adapter, a mixed batch inside another
            (before any layer changes); in the block, a layer input whose row count is not
            ``len(adapter_names)``, naming the layer.
    """
    found = find_adapters(model)
    if found is None:
        raise ValueError("the model has no adapters (inject_adapters was not called on it)")
    if isinstance(adapter_names, str) or not len(adapter_names):
        raise ValueError(
            f"adapter_names must be a non-empty list with one name per row, got {adapter_names!r}"
        )
    names = list(adapter_names)
    adapters = list(dict.fromkeys(n for n in names if n != BASE_ROWS))
    checked_names(model, adapters)
    _, root, _ = found
    all_sites = list(sites(root))
    refusal = _refusal(all_sites, adapters)
    if refusal is not None:
        raise ValueError(refusal)
    position = {name: k for k, name in enumerate(adapters)}
    index = torch.tensor([position.get(n, -1) for n in names], dtype=torch.int64)
    batch = MixedBatch(names, adapters, index, position, {id(s): p for p, s in all_sites})
    keys = ("router", "active_here", MIXED_ATTR)
    saved = [
        (site, {k: site.__dict__[k] for k in keys if k in site.__dict__}) for _, site in all_sites
    ]
    try:
        for _, site in all_sites:
            site.router = mixed_route
            site.__dict__[MIXED_ATTR] = batch
        yield model
    finally:
        for site, before in saved:
            for key in keys:
                site.__dict__.pop(key, None)
            site.__dict__.update(before)


def mixed_route(site: AdapterLayer, x: Tensor) -> Tensor:
    """A site's forward in a mixed batch (see the module docstring)."""
    batch: MixedBatch = site.__dict__[MIXED_ATTR]
    if x.dim() == 0 or x.shape[0] != len(batch.names):
        rows = x.shape[0] if x.dim() else 0
        raise ValueError(
            f"a mixed batch of {len(batch.names)} rows (adapter_names) reached "
            f"{batch.paths[id(site)]!r} with an input of shape {tuple(x.shape)}: {rows} rows; "
            "give one name per row of the batch (with beam search, repeat each name num_beams "
            "times, as peft's generate does)"
        )
    # one pass over the site's layers (a dict lookup each), in the batch's adapter order
    position = batch.position
    here = sorted(
        (position[layer.adapter_name], layer)
        for layer in site_layers(site)
        if layer.adapter_name in position and not layer.disabled
    )
    if not here or site.disabled:
        return site.compose(x, [])
    layers = [layer for _, layer in here]
    mixed_output = getattr(site, "mixed_output", None)
    if mixed_output is not None and site.grouped_refusal(layers) is None:
        n_rows = x.numel() // x.shape[-1]
        groups, local = batch.grouping(tuple(k for k, _ in here), n_rows, x.device)
        return mixed_output(x, layers, groups, local)
    out = site.compose(x, [])
    for k, layer in here:
        rows = batch.rows_of(k, x.device)
        out = out.index_copy(0, rows, site.compose(x.index_select(0, rows), [layer]))
    return out


# -- the keyword --------------------------------------------------------------------------------


def _pop_adapter_names(root: nn.Module, args: tuple, kwargs: dict):
    names = kwargs.pop("adapter_names", None)
    if names is None:
        return None
    context = mixed_batch(root, names)
    context.__enter__()
    root.__dict__["_open_mixed_batch"] = context
    return args, kwargs


def _close_adapter_names(root: nn.Module, args, kwargs, output):
    context = root.__dict__.pop("_open_mixed_batch", None)
    if context is not None:
        context.__exit__(None, None, None)
    return None


class AdapterNamesGenerate:
    """``root.generate`` with peft's keyword: the class's ``generate``, in a mixed batch when
    ``adapter_names`` is given (each name repeated ``num_beams`` times: beam search expands
    every row so). An object holding ``root`` (not a closure), so that ``deepcopy`` and pickle
    give a copy of the model its own."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root

    def __call__(self, *args, adapter_names: list[str] | None = None, **kwargs):
        root = self.root
        generate = type(root).generate
        if adapter_names is None:
            return generate(root, *args, **kwargs)
        config = kwargs.get("generation_config") or getattr(root, "generation_config", None)
        beams = kwargs.get("num_beams") or getattr(config, "num_beams", None) or 1
        names = [name for name in adapter_names for _ in range(beams)]
        with mixed_batch(root, names):
            return generate(root, *args, **kwargs)


def accept_adapter_names(root: nn.Module) -> None:
    """Let ``root(..., adapter_names=[...])`` (and ``root.generate(..., adapter_names=...)``,
    for a model that has ``generate``) run as a mixed batch (idempotent)."""
    if _KEYWORD_HANDLES in root.__dict__:
        return
    root.__dict__[_KEYWORD_HANDLES] = (
        root.register_forward_pre_hook(_pop_adapter_names, with_kwargs=True),
        root.register_forward_hook(_close_adapter_names, with_kwargs=True, always_call=True),
    )
    if callable(getattr(type(root), "generate", None)):
        root.generate = AdapterNamesGenerate(root)


def refuse_adapter_names(root: nn.Module) -> None:
    """Remove what ``accept_adapter_names`` added (unload)."""
    for handle in root.__dict__.pop(_KEYWORD_HANDLES, ()):
        handle.remove()
    if isinstance(root.__dict__.get("generate"), AdapterNamesGenerate):
        del root.__dict__["generate"]
