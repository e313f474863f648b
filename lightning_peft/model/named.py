"""Named adapters on one frozen base: which there are, which are active, deleting one.

``inject_adapters(model, config, name=...)`` adds an adapter beside those there (the layout is in
``lightning_peft.model.sites``). Several active adapters act together as in peft's
``base_model.set_adapter([...])``: LoRA/DoRA ``y = base(x) + Σ_k delta_k(x)`` (each DoRA delta
relative to the base W), IA³ the product of the vectors. Only the active adapters train.
"""

from __future__ import annotations

from torch import nn

from lightning_peft.model.injection import AdapterSet, find_adapters, mark_active_trainable
from lightning_peft.model.sites import SITE_DICT, layer_named, site_layers, sites

__all__ = [
    "active_adapters",
    "adapter_names",
    "checked_names",
    "delete_adapter",
    "set_active_adapters",
]


def _adapters(model: nn.Module) -> tuple[nn.Module, AdapterSet]:
    found = find_adapters(model)
    if found is None:
        raise ValueError("the model has no adapters (inject_adapters was not called on it)")
    return found[1], found[2]


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the model's adapters, in injection order."""
    return list(_adapters(model)[1].states)


def active_adapters(model: nn.Module) -> list[str]:
    """The names of the active adapters (those the forward applies and that train)."""
    return list(_adapters(model)[1].active)


def checked_names(model: nn.Module, names: str | list[str] | None) -> list[str]:
    """``names`` as a list (None: the active adapters), each one the model has; else
    ``ValueError`` naming the unknown one and the model's adapters."""
    adapters = _adapters(model)[1]
    if names is None:
        return list(adapters.active)
    listed = [names] if isinstance(names, str) else list(names)
    for name in listed:
        if name not in adapters.states:
            raise ValueError(
                f"the model has no adapter named {name!r}; its adapters are "
                f"{', '.join(map(repr, adapters.states))}"
            )
    if len(set(listed)) != len(listed):
        raise ValueError(f"adapter names listed twice: {listed!r}")
    return listed


def set_active_adapters(model: nn.Module, names: str | list[str]) -> None:
    """Make ``names`` the active adapters (one name, or several that act together), as peft's
    ``base_model.set_adapter``: they apply in forward and train; every other adapter is frozen.

    Raises:
        ValueError: an empty list, a name the model does not have, a name listed twice; the
            model is unchanged then.
    """
    listed = checked_names(model, names)
    if not listed:
        raise ValueError("set_active_adapters needs at least one adapter name")
    root, adapters = _adapters(model)
    adapters.active = listed
    mark_active_trainable(root, adapters)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove the adapter ``name``. Where it is a site's own layer and other adapters sit there,
    the first of them takes the site's place (its tensors keep their values); where it was
    alone, the base module returns. An active adapter leaves the active set (if none remains,
    the first adapter left becomes active, as in peft).

    Raises:
        ValueError: an unknown name, the model's only adapter (``unload(model, merge=False)``
            removes it), an adapter merged into the weights (``unmerge_adapters`` first); the
            model is unchanged then.
    """
    checked_names(model, name)
    root, adapters = _adapters(model)
    if len(adapters.states) == 1:
        raise ValueError(
            f"{name!r} is the model's only adapter; unload(model, merge=False) removes it"
        )
    merged = [p for p, s in sites(root) if (layer := layer_named(s, name)) and layer.merged]
    if merged:
        raise ValueError(
            f"adapter {name!r} is merged into the weights (e.g. at {merged[0]!r}); call "
            f"unmerge_adapters(model, names=[{name!r}]) before deleting it"
        )
    for path, site in list(sites(root)):
        layer = layer_named(site, name)
        if layer is None:
            continue
        if layer is not site:
            nested = site._modules[SITE_DICT]
            del nested[name]
            if not len(nested):
                delattr(site, SITE_DICT)
        else:
            _remove_site(root, path, site)
    del adapters.states[name]
    adapters.active = [n for n in adapters.active if n != name] or [next(iter(adapters.states))]
    mark_active_trainable(root, adapters)


def _remove_site(root: nn.Module, path: str, site) -> None:
    """Take the site layer out: the first nested layer takes its place (holding the rest), or,
    if none, the base module returns."""
    others = site_layers(site)[1:]
    placement = type(site).placement
    if not others:
        placement.detach(root, path, site)
        return
    heir, rest = others[0], others[1:]
    delattr(site, SITE_DICT)
    heir.nested = False
    if rest:
        heir.add_module(SITE_DICT, nn.ModuleDict({layer.adapter_name: layer for layer in rest}))
    placement.attach(root, placement.target_path(path), heir)
