"""Model-level helpers: merge, unmerge, unload, disable, adapter state dict, trainables.

Written against the ``AdapterLayer`` protocol: they work for every registered method.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from lightning_peft.core.adapter import AdapterLayer
from lightning_peft.core.distributed import clean_name
from lightning_peft.methods.registry import adapter_layers
from lightning_peft.model.injection import (
    STATE_ATTR,
    adapter_parameters,
    find_adapters,
    find_injection,
)
from lightning_peft.model.mixed import refuse_adapter_names
from lightning_peft.model.named import checked_names
from lightning_peft.model.sites import layers_of, refresh_routes


def _named_layers(model: nn.Module, names) -> list[tuple[str, AdapterLayer]]:
    """The layers of the adapters ``names`` (None: the active ones); every adapter layer of a
    model that has no adapter set (layers built by hand)."""
    found = find_adapters(model)
    if found is None:
        return list(adapter_layers(model))
    prefix = f"{found[0]}." if found[0] else ""
    return [(prefix + p, layer) for p, layer in layers_of(found[1], checked_names(model, names))]


def _refresh(model: nn.Module) -> None:
    found = find_adapters(model)
    if found is not None:
        refresh_routes(found[1], found[2].active)


def merge_adapters(model: nn.Module, names: str | list[str] | None = None) -> int:
    """Merge the layers of the adapters ``names`` (None: the active ones; with one adapter,
    every adapter layer) into their base weights (idempotent); returns how many. Several
    adapters at one module merge in turn, in the order given (peft's order).

    A layer the model reaches by several paths (one block held in two places) is one layer: it
    merges once.

    Raises:
        ValueError: the model has a layer that cannot merge (e.g. a bottleneck adapter, which is
            non-linear; a LoRA on a grouped convolution; a layer whose weight another module
            shares, as tied embeddings do), naming it; nothing is merged then.
    """
    layers = _named_layers(model, names)
    owners = _parameter_owners(model)
    for path, layer in layers:
        reason = layer.merge_refusal() or _shared_weight_refusal(path, layer, owners)
        if reason is not None:
            raise ValueError(f"{path or 'the model'}: {reason}")
    for _, layer in layers:
        layer.merge()
    _refresh(model)
    return len(layers)


def _parameter_owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """``{id(parameter): [("<module path>.<name>", module) for every path that holds it]}``
    (a module reached by two paths is listed under both)."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for name, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append(
                    (f"{path}.{name}" if path else name, module)
                )
    return owners


def _shared_weight_refusal(path: str, layer: AdapterLayer, owners: dict) -> str | None:
    """A merge writes the base tensors the layer holds in place: refuse when another module holds
    one of them too (tied weights), since the merge would change it as well. The layer itself
    reached by another path is no other module: its merge is the same merge, done once."""
    if layer.merged:
        return None
    adapter = set(layer.adapter_parameter_names())
    for name, param in layer._parameters.items():
        if param is None or name in adapter:
            continue
        others = [
            owner
            for owner, module in owners.get(id(param), [])
            if module is not layer and not _same_site(module, layer)
        ]
        if others:
            return (
                f"its {name} is also {others[0]!r} (tied weights), which merging would change "
                "too; keep the adapter unmerged, or untie the weights first"
            )
    return None


def _same_site(module: nn.Module, layer: AdapterLayer) -> bool:
    """``module`` is another adapter layer on ``layer``'s base module (a named adapter beside
    it, sharing its tensors): not a tie."""
    return isinstance(module, AdapterLayer) and module.base_layer is layer.base_layer


def unmerge_adapters(model: nn.Module, names: str | list[str] | None = None) -> int:
    """Undo ``merge_adapters`` for the adapters ``names`` (None: every adapter), in reverse
    order (idempotent); returns how many layers."""
    found = find_adapters(model)
    if names is None and found is not None:
        names = list(found[2].states)
    layers = [layer for _, layer in _named_layers(model, names) if layer.mergeable]
    for layer in reversed(layers):
        layer.unmerge()
    _refresh(model)
    return len(layers)


def unload(model: nn.Module, merge: bool = True, names: str | list[str] | None = None) -> nn.Module:
    """Remove every adapter, putting the original modules back; with ``merge`` the updates of
    the adapters ``names`` (None: the active ones; mergeable layers: LoRA/DoRA, IA³) are merged
    into their weights first, and the others dropped; without, they are all dropped (the base
    returns). A model with non-mergeable adapters needs ``merge=False``.

    Parameters keep their ``requires_grad`` flags as they are; returns ``model``.
    """
    if merge:
        merge_adapters(model, names)
    else:
        unmerge_adapters(model)
    for path, layer in list(adapter_layers(model)):
        if not layer.nested:  # a nested layer leaves with its site
            type(layer).placement.detach(model, path, layer)
    found = find_injection(model)
    if found is not None:
        refuse_adapter_names(found[1])
        delattr(found[1], STATE_ATTR)
    return model


@contextmanager
def disable_adapters(model: nn.Module, names: str | list[str] | None = None) -> Iterator[nn.Module]:
    """Run ``model`` without the adapters ``names`` inside the block (None: every adapter: the
    base model), then restore.

    Raises:
        ValueError: adapters merged into the weights (skipping them would still apply their
            update), before any layer changes: ``unmerge_adapters(model)`` first.
    """
    found = find_adapters(model)
    if names is None or found is None:
        named: list[tuple[str, AdapterLayer]] = list(adapter_layers(model))
    else:
        named = _named_layers(model, names)
    merged = [name for name, layer in named if getattr(layer, "merged", False)]
    if merged:
        raise ValueError(
            f"cannot disable adapters that are merged into the weights ({len(merged)} layers, "
            f"e.g. {merged[0]!r}): their update is in the base weights; call "
            "unmerge_adapters(model) first"
        )
    layers = [layer for _, layer in named]
    before = [layer.disabled for layer in layers]
    try:
        for layer in layers:
            layer.disabled = True
        yield model
    finally:
        for layer, flag in zip(layers, before, strict=True):
            layer.disabled = flag


def adapter_state_dict(model: nn.Module, name: str | None = None) -> dict[str, Tensor]:
    """The tensors of the adapter ``name`` (None: the active adapter, when one is active),
    ``modules_to_save`` and trained biases, keyed as in ``model.state_dict()`` (FSDP1 wrapper
    segments removed; a module held in two places appears under both names); detached, not
    copied.

    Raises:
        ValueError: no adapters; an unknown name; ``name`` None while several are active.
    """
    found = find_adapters(model)
    if found is None:
        raise ValueError("the model has no adapters (inject_adapters was not called on it)")
    prefix, root, adapters = found
    if name is None and len(adapters.active) > 1:
        raise ValueError(
            f"several adapters are active ({', '.join(map(repr, adapters.active))}): name the "
            "one whose tensors you want, adapter_state_dict(model, name=...)"
        )
    state = adapters.states[checked_names(model, name or adapters.active[0])[0]]
    prefix = f"{prefix}." if prefix else ""
    return {
        clean_name(prefix + name): param.detach() for name, param in adapter_parameters(root, state)
    }


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` of every parameter that requires grad."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}
