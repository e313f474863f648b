"""Where named adapters sit, what names they may have, and how a site's forward is routed.

A *site* is an adapter layer in the model tree (the first adapter injected at a base module, its
name in ``layer.adapter_name``). Every further named adapter at that base module is another
layer of the same class, built on the same base module and held in the site's ``nn.ModuleDict``
``named_adapters`` (``layer.nested`` is True): it shares the frozen base tensors (the same
objects) and leaves them out of its state dict. A site whose active adapters are exactly its own
runs its plain forward (``router`` is None); otherwise ``router`` composes the active layers
(``AdapterLayer.compose``: LoRA sums the deltas, IA³ multiplies the vectors), or runs a mixed
batch (``lightning_peft.model.mixed``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from torch import Tensor, nn

from lightning_peft.core.adapter import AdapterLayer
from lightning_peft.methods.registry import method_for
from lightning_peft.model.targeting import refuse_existing_adapters

SITE_DICT = "named_adapters"
BASE_ROWS = "__base__"  # a row of a mixed batch that runs the base model
DEFAULT_NAME = "default"


def check_adapter_name(name: object, layer_classes: Iterable[type] = ()) -> str:
    """``name`` if it can be an adapter's key and its directory name; else ``ValueError``.

    Refused: a non-string, the empty name, ``.`` / ``/`` / ``\\`` anywhere in it (a module key
    cannot hold a dot; a directory name cannot hold a separator, and ``..`` would leave the
    save directory), surrounding whitespace, ``"__base__"`` (a mixed batch's row without
    adapter), and a name that is an attribute of ``nn.ModuleDict`` or of a layer class (it
    would shadow one).
    """
    if not isinstance(name, str):
        raise ValueError(f"an adapter name must be a string, got {type(name).__name__}")
    why = None
    if not name or name.strip() != name:
        why = "it is empty or has surrounding whitespace"
    elif any(c in name for c in "./\\"):
        why = "it holds '.', '/' or '\\' (it is a module key and a directory name)"
    elif name == BASE_ROWS:
        why = f"{BASE_ROWS!r} marks the rows of a mixed batch that run without adapter"
    elif hasattr(nn.ModuleDict, name) or any(hasattr(cls, name) for cls in layer_classes):
        why = "it is the name of an attribute of the layers that hold named adapters"
    if why is not None:
        raise ValueError(f"invalid adapter name {name!r}: {why}; choose another name")
    return name


def one_adapter_refusal(kind: str, where: str) -> str:
    return (
        f"{kind} (at {where!r}) holds one adapter per model: no second named adapter can go "
        "there; leave the module out of this adapter's targets, or unload the adapters first"
    )


def check_beside(model: nn.Module, found, config, name: str) -> None:
    """Refuse, naming the reason, an adapter ``name`` with ``config`` beside the adapters of
    ``model`` (``found``: ``find_adapters(model)``): the name taken (``"default"``: the model
    has adapters, as before named adapters), another method, a layer that holds one adapter, a
    bias or ``modules_to_save`` in either (peft: one adapter with bias; its copies of the
    modules to save per adapter are not here), and what a layer class refuses beside others
    (``named_refusal``)."""
    if found is None or (name == DEFAULT_NAME and name in found[2].states):
        refuse_existing_adapters(model)
    adapters = found[2]
    if name in adapters.states:
        raise ValueError(
            f"the model already has an adapter named {name!r} ({', '.join(adapters.states)}); "
            f"choose another name, or delete_adapter(model, {name!r}) first"
        )
    theirs, mine = method_for(adapters.primary.config), method_for(config)
    if mine is not theirs:
        raise ValueError(
            f"the model's adapters are {theirs.label or theirs.name}; named adapters of one model "
            f"share a method, and this config is {mine.label or mine.name}"
        )
    for path, site in sites(model):
        if not type(site).supports_named:
            raise ValueError(one_adapter_refusal(type(site).__name__, path))
    for label, state_config in [(f"{name!r}", config)] + [
        (f"{other!r}", state.config) for other, state in adapters.states.items()
    ]:
        bias = getattr(state_config, "bias", "none")
        if bias != "none":
            raise ValueError(
                f"adapter {label} trains biases (bias={bias!r}); several adapters on one model "
                "need bias='none' for all of them (as in peft)"
            )
        if getattr(state_config, "modules_to_save", None):
            raise ValueError(
                f"adapter {label} trains modules_to_save={state_config.modules_to_save!r} in "
                "full; named adapters here share the base model, so several adapters need "
                "modules_to_save=None for all of them"
            )


# -- the tree -----------------------------------------------------------------------------------


def sites(root: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """``(path, site layer)`` for every adapter layer in the tree (nested ones excluded), in
    ``named_modules`` order. The walk does not enter a site's ``named_adapters`` (its nested
    layers are no sites, and with k adapters they are most of the tree's modules)."""
    seen: set[int] = set()
    stack = [("", root)]
    while stack:
        path, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        is_site = isinstance(module, AdapterLayer) and not module.nested
        if is_site:
            yield path, module
        children = [
            (f"{path}.{name}" if path else name, child)
            for name, child in module._modules.items()
            if child is not None and not (is_site and name == SITE_DICT)
        ]
        stack.extend(reversed(children))


def site_layers(site: AdapterLayer) -> list[AdapterLayer]:
    """The site's own layer, then its nested ones in insertion order."""
    nested = site._modules.get(SITE_DICT)
    return [site, *nested.values()] if nested is not None else [site]


def layer_named(site: AdapterLayer, name: str) -> AdapterLayer | None:
    """The layer of adapter ``name`` at ``site``, or None (the adapter does not target it)."""
    if site.adapter_name == name:
        return site
    nested = site._modules.get(SITE_DICT)
    return nested[name] if nested is not None and name in nested else None


def nested_path(site_path: str, name: str) -> str:
    """The module path of the nested layer of adapter ``name`` at the site ``site_path``."""
    return f"{site_path}.{SITE_DICT}.{name}" if site_path else f"{SITE_DICT}.{name}"


def site_path_of(layer_path: str) -> str:
    """The site's path for a layer's module path (a nested layer's site; a site's own)."""
    head, sep, _ = layer_path.rpartition(f"{SITE_DICT}.")
    if not sep:
        return layer_path
    return head.removesuffix(".")


def layers_of(root: nn.Module, names: Iterable[str]) -> list[tuple[str, AdapterLayer]]:
    """``(module path, layer)`` of every layer of the adapters ``names`` (site order)."""
    wanted = list(names)
    out = []
    for path, site in sites(root):
        for name in wanted:
            layer = layer_named(site, name)
            if layer is not None:
                out.append((path if layer is site else nested_path(path, name), layer))
    return out


def add_nested(site: AdapterLayer, name: str, layer: AdapterLayer) -> None:
    """Hold ``layer`` (built on ``site``'s base module) as adapter ``name`` at ``site``."""
    layer.adapter_name, layer.nested = name, True
    if SITE_DICT not in site._modules:
        site.add_module(SITE_DICT, nn.ModuleDict())
    site._modules[SITE_DICT][name] = layer


# -- routing ------------------------------------------------------------------------------------


def compose_route(site: AdapterLayer, x: Tensor) -> Tensor:
    """The router of a site whose active adapters are not exactly its own."""
    return site.compose(x, [layer_named(site, name) for name in site.active_here])


def nested_route(site: AdapterLayer, x: Tensor) -> Tensor:
    """The router of a site whose one active adapter is a nested one: that layer's own
    forward (on the shared base tensors)."""
    return site._modules[SITE_DICT][site.active_here[0]](x)


def refresh_routes(root: nn.Module, active: list[str]) -> None:
    """Give each site the router its active adapters need: none where exactly the site's own
    adapter is active and nothing nested is merged (the single-adapter forward, unchanged),
    ``nested_route`` where one nested adapter is active and nothing is merged, and
    ``compose_route`` elsewhere."""
    for _, site in sites(root):
        layers = site_layers(site)
        here = tuple(name for name in active if layer_named(site, name) is not None)
        if here == (site.adapter_name,) and not any(layer.merged for layer in layers[1:]):
            site.__dict__.pop("router", None)
            site.__dict__.pop("active_here", None)
            continue
        one = len(here) == 1 and not any(layer.merged for layer in layers)
        site.router = nested_route if one else compose_route
        site.active_here = here
