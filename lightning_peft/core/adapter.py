"""The adapter-layer protocol, where a layer sits in the model, and what a method declares.

Every adapter layer subclasses ``AdapterLayer`` (torchtune's ``AdapterModule``, peft's
``BaseTunerLayer``): it names its adapter tensors, has a ``disabled`` flag, ``merge``/``unmerge``
when its update is linear, and knows the base module it adapts. Its class declares, before any
layer exists, which modules it adapts (``adapts``), what it refuses (``check``), the shapes of its
tensors (``adapter_shapes``) and their keys in a PEFT file (``saved_names``). Injection, the model
helpers, the PEFT format and LoRA+ are written against this protocol alone.

A ``Method`` (one per module in ``lightning_peft.methods``) ties a config class and a peft type to
its layer classes, tried in order for each target (peft's dispatchers): a new layer type is one
class and one entry in that tuple.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_peft.core.command_line import CommandLine

PEFT_PREFIX = "base_model.model."


@runtime_checkable
class AdapterConfigLike(Protocol):
    """What every method's config is: a dataclass (``LoRAConfig``, ``AdapterConfig``,
    ``IA3Config``, ``PromptTuningConfig``, or a method registered from outside) with the modules
    trained in full and the fields that define its adapters. Its method is
    ``methods.registry.method_for(config)``."""

    modules_to_save: list[str] | None

    def to_dict(self) -> dict[str, Any]:
        """The fields that define the adapters (peft's inert fields left out)."""
        ...


# -- module kinds -------------------------------------------------------------------------------


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): ``y = x @ weight + bias`` with weight (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` (and subclasses, quantized ones included) or transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def quantized_reason(module: nn.Module) -> str | None:
    """Why ``module`` is no plain float layer (bitsandbytes, packed ints), or None.

    bitsandbytes' layers subclass ``nn.Linear`` (or ``nn.Embedding``) but may hold packed
    weights; they are recognised by their classes' module names, without importing bitsandbytes.
    Float layer classes refuse them; the ones adapted over a quantized base (``Linear4bit``,
    ``Linear8bitLt``: ``methods/lora/quantized.py``) come first in a method's dispatch.
    """
    weight = getattr(module, "weight", None)
    classes = [*type(module).__mro__, type(weight)]
    library = next(
        (c.__module__.split(".")[0] for c in classes if c.__module__.startswith("bitsandbytes")),
        None,
    )
    if library is not None:
        return f"a bitsandbytes {type(module).__name__} ({type(weight).__name__} weights)"
    if weight is not None and not weight.is_floating_point():
        return (
            f"a {type(module).__name__} whose weight is {weight.dtype}, not a float tensor "
            "(a quantized or packed layer); it cannot be adapted"
        )
    return None


# -- where a layer sits -------------------------------------------------------------------------


class Replace:
    """The layer takes its target's place in the parent module.

    Contract: the layer registers the base module's own parameters under the same names
    (``weight``, ``bias``), so the frozen state-dict keys do not change, and ``unwrap()`` hands
    back the base module with them.
    """

    def layer_path(self, target: str) -> str:
        return target

    def target_path(self, layer_path: str) -> str:
        return layer_path

    def check(self, model: nn.Module, target: str, paths: list[str]) -> None:
        """Refuse a target module that one parent holds under two names, or two parents hold:
        replacing it in one place would leave the base in the others (peft does that)."""
        parent, _, child = target.rpartition(".")
        owner = model.get_submodule(parent)
        for path in paths:
            other_parent, _, other_child = path.rpartition(".")
            if model.get_submodule(other_parent) is not owner or other_child != child:
                raise ValueError(
                    f"the module {target!r} is also at {path!r} (one module in two places); an "
                    "adapter that replaces it in one place would leave the base model in the "
                    "other: target a module that appears once, or give each place its own module"
                )

    def attach(self, model: nn.Module, target: str, layer: AdapterLayer) -> None:
        parent, _, child = target.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)

    def detach(self, model: nn.Module, layer_path: str, layer: AdapterLayer) -> None:
        parent, _, child = layer_path.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.unwrap())


@dataclass(frozen=True)
class ChildHook:
    """The layer becomes the child ``child`` of its target, and ``hook`` (a forward hook, a
    module-level function so that it survives ``deepcopy``) runs the target's output through it.
    The target's own parameter names do not change."""

    child: str
    hook: Callable

    def layer_path(self, target: str) -> str:
        return f"{target}.{self.child}" if target else self.child

    def target_path(self, layer_path: str) -> str:
        return layer_path.removesuffix(self.child).removesuffix(".")

    def check(self, model: nn.Module, target: str, paths: list[str]) -> None:
        """A child and a hook on the module act at every place that holds it: nothing to refuse."""

    def attach(self, model: nn.Module, target: str, layer: AdapterLayer) -> None:
        module = model.get_submodule(target)
        module.add_module(self.child, layer)
        keep_hook_handles(layer, module.register_forward_hook(self.hook))

    def detach(self, model: nn.Module, layer_path: str, layer: AdapterLayer) -> None:
        remove_hook_handles(layer)
        delattr(model.get_submodule(self.target_path(layer_path)), self.child)


_HANDLES = "_adapter_hook_handles"


def keep_hook_handles(layer: nn.Module, *handles: RemovableHandle) -> None:
    """Keep the handles of the hooks ``layer`` needs on other modules, for ``detach``: a plain
    attribute of the layer, so ``deepcopy`` of the model copies each handle with the hook
    dictionaries it points to."""
    layer.__dict__.setdefault(_HANDLES, []).extend(handles)


def remove_hook_handles(layer: nn.Module) -> None:
    """Remove the hooks ``keep_hook_handles`` kept for ``layer``."""
    for handle in layer.__dict__.pop(_HANDLES, []):
        handle.remove()


REPLACE = Replace()


# -- the layer protocol -------------------------------------------------------------------------


class AdapterLayer(nn.Module):
    """The protocol of every adapter layer.

    Class-level declarations (used before injection, by the fit checks and the file format):

    - ``placement``: ``REPLACE``, a ``ChildHook``, or a method's own object with the same five
      methods (prompt tuning's ``PromptPlacement``).
    - ``adapts(module)``: whether this class adapts ``module`` (dispatch, tried in order);
      ``adapts_kinds`` names those modules for error messages (``Method.scope``).
    - ``check(module, config, name)``: raise ``ValueError`` naming ``name`` for a config that
      cannot go there (before the model is touched).
    - ``adapter_shapes(module, config, name)``: ``{local name: shape}`` of the adapter tensors a
      layer built on ``module`` holds; local names are relative to the layer.
    - ``saved_names``: local name -> key suffix in a PEFT file (default: the local name);
      ``peft_key(layer_path, local_name)`` builds the whole key from it.
    - ``mergeable``: whether the update folds into the base weight; ``why_not_mergeable`` says
      why not (a mergeable layer may still refuse one merge: ``merge_refusal()``).
    - ``fast_names``: the local names LoRA+ trains at a higher learning rate ("B" factors).
    - ``build(module, config, name)``: the layer for ``module``.

    Instance: ``adapter_parameter_names()`` (the keys of ``adapter_shapes``), ``disabled``,
    ``merged``, ``merge()`` / ``unmerge()``, ``merge_refusal()``, ``base_layer``, ``unwrap()``
    (``REPLACE`` only), ``describe()`` for the report. Adapter parameters keep their dtype
    through ``model.to(dtype)``.
    """

    placement: ClassVar[Replace | ChildHook] = REPLACE
    adapts_kinds: ClassVar[tuple[str, ...]] = ()  # the modules it adapts, for ``Method.scope``
    over_quantized: ClassVar[bool] = False  # adapts a quantized base: listed last in the scope
    mergeable: ClassVar[bool] = False
    why_not_mergeable: ClassVar[str] = "are non-linear and cannot be merged into weights"
    saved_names: ClassVar[Mapping[str, str]] = {}
    fast_names: ClassVar[tuple[str, ...]] = ()

    disabled: bool
    merged: bool

    # Named adapters (``lightning_peft.model.named``). ``adapter_name``: the adapter this layer
    # belongs to. ``supports_named``: whether further named adapters can sit beside this one at
    # the same base module (each another layer of the class, held in the site layer's
    # ``named_adapters``, sharing the base tensors). ``nested``: this layer is such a further
    # adapter (its shared base tensors are left out of its state dict). ``router``: None, or a
    # function ``(layer, *inputs) -> output`` that the forward of a site holding several active
    # adapters (or running a mixed batch) hands its inputs to; the one attribute a single-adapter
    # forward tests.
    adapter_name: str = "default"
    supports_named: ClassVar[bool] = False
    nested: bool = False
    router: Callable | None = None

    # -- class level: before injection ----------------------------------------------------------

    @classmethod
    def adapts(cls, module: nn.Module) -> bool:
        raise NotImplementedError

    @classmethod
    def check(cls, module: nn.Module, config: Any, name: str) -> None:
        """Raise ``ValueError`` naming ``name`` if ``config`` cannot adapt ``module``."""

    @classmethod
    def adapter_shapes(cls, module: nn.Module, config: Any, name: str) -> dict[str, tuple]:
        raise NotImplementedError

    @classmethod
    def build(cls, module: nn.Module, config: Any, name: str) -> AdapterLayer:
        raise NotImplementedError

    @classmethod
    def saved_name(cls, local_name: str) -> str:
        """The key suffix of the tensor ``local_name`` (relative to the layer) in a PEFT file."""
        return cls.saved_names.get(local_name, local_name)

    @classmethod
    def peft_key(cls, layer_path: str, local_name: str) -> str:
        """The PEFT-file key of the tensor ``local_name`` of the layer at ``layer_path``
        (``base_model.model.<path>.<suffix>``; a method whose file layout differs overrides it)."""
        return f"{PEFT_PREFIX}{layer_path}.{cls.saved_name(local_name)}"

    # -- instance -------------------------------------------------------------------------------

    def adapter_parameter_names(self) -> list[str]:
        raise NotImplementedError

    def adapter_buffer_names(self) -> list[str]:
        """Buffers that keep their dtype like the adapter parameters (caches)."""
        return []

    @property
    def base_layer(self) -> nn.Module:
        raise NotImplementedError

    def unwrap(self) -> nn.Module:
        """The base module, holding its own parameters again (``REPLACE`` layers)."""
        raise NotImplementedError

    def merge_refusal(self) -> str | None:
        """Why this layer cannot merge (checked for every layer before any layer merges), or
        None. A mergeable class may refuse for one instance (a grouped convolution, a
        ``lora_bias`` on a layer without a bias)."""
        if not self.mergeable:
            return f"{type(self).__name__} adapters {self.why_not_mergeable}"
        return None

    def merge(self) -> None:
        raise ValueError(self.merge_refusal())

    def unmerge(self) -> None:
        """Nothing to undo for a layer that never merges."""

    def describe(self) -> tuple[str, str, int]:
        """``(kind, shape, rank)`` for the injection report."""
        raise NotImplementedError

    # -- named adapters -------------------------------------------------------------------------

    @classmethod
    def named_refusal(cls, config: Any, name: str) -> str | None:
        """Why an adapter ``name`` with ``config`` cannot sit beside others at a module of this
        class (e.g. an init that rewrites the shared base weight), or None."""
        return None

    def compose(self, x: Any, layers: list[AdapterLayer]) -> Any:
        """The output of this site with ``layers`` (adapters at this site, this layer possibly
        among them) active together; only for classes with ``supports_named``."""
        raise NotImplementedError

    def shared_names(self) -> list[str]:
        """The base module's tensors this layer holds under their own names (shared, not owned
        by the adapter): a nested layer leaves them out of its state dict."""
        base = self.base_layer
        return [*base._parameters, *base._buffers]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.nested:  # the site layer saves the base tensors once
            for name in self.shared_names():
                destination.pop(prefix + name, None)

    def _load_from_state_dict(
        self, state_dict, prefix, metadata, strict, missing, unexpected, errors
    ):
        super()._load_from_state_dict(
            state_dict, prefix, metadata, strict, missing, unexpected, errors
        )
        if self.nested:
            shared = {prefix + name for name in self.shared_names()}
            missing[:] = [key for key in missing if key not in shared]

    def _apply(self, fn, recurse=True):
        # Adapters stay in their configured dtype through model.to(dtype) / .half() / Lightning's
        # "bf16-true": they follow device moves only.
        names = self.adapter_parameter_names() + self.adapter_buffer_names()
        return keep_adapter_dtype(self, names, fn, recurse)


def keep_adapter_dtype(module: nn.Module, names: list[str], fn, recurse: bool) -> nn.Module:
    """``nn.Module._apply`` that restores the dtype (and exact values) of the named tensors."""

    def lookup(name: str):
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        return owner._parameters.get(leaf, owner._buffers.get(leaf))

    before = {name: lookup(name).detach() for name in names}  # old data, no copy
    result = nn.Module._apply(module, fn, recurse)
    for name, old in before.items():
        tensor = lookup(name)
        if tensor.dtype != old.dtype:
            tensor.data = tensor.data.to(old.dtype) if old.is_meta else old.to(tensor.device)
    return result


# -- methods ------------------------------------------------------------------------------------


def base_model_name(model: nn.Module) -> str | None:
    """``model.config.name_or_path`` (a transformers model's), for a PEFT file's
    ``base_model_name_or_path``; None when there is none or it is empty."""
    return getattr(getattr(model, "config", None), "name_or_path", None) or None


def config_from_file(config_cls: type, data: dict, path: Path) -> Any:
    """``config_cls(**data)`` from peft's ``adapter_config.json`` content, or a ``ValueError``
    naming ``path``: a field ``config_cls`` does not know is dropped at an inert value (a newer
    peft's) and refused otherwise, rather than ignored."""
    known = set(config_cls.__dataclass_fields__)
    for name in sorted(set(data) - known):
        if data[name] in (False, [], {}, ""):
            del data[name]
        else:
            raise ValueError(
                f"{path}: {name}={data[name]!r} is a field this package does not know (a newer "
                "peft?); refusing rather than ignoring it"
            )
    try:
        return config_cls(**data)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None


@dataclass(frozen=True)
class Method:
    """One adapter method.

    Args:
        name: the config's ``method`` (e.g. ``"lora"``).
        peft_type: ``peft_type`` in ``adapter_config.json`` (peft's name where peft has it).
        config_cls: its config dataclass.
        layers: the layer classes, tried in order for each target module.
        write_config: ``(model, config, targets) -> dict``, the ``adapter_config.json`` content.
        read_config: ``(data, path) -> config`` from an ``adapter_config.json``; refuses by name
            whatever it cannot load exactly.
        scope: which modules it adapts, for error messages; by default ``label`` + "adapts" +
            the layer classes' ``adapts_kinds`` (float layers first) + ``scope_note``
            ("IA³ adapts nn.Linear, Conv1D, nn.Conv2d and nn.Conv3d only").
        label: the method's name in messages ("LoRA", "IA³").
        scope_note: words after the derived scope (" only").
        select: ``(model, config) -> [module names]`` for a method whose targets are not chosen
            by ``target_modules`` (prompt tuning: the input embedding); None for peft's rules.
        file_prefix: the prefix of the model's own saved tensors (``modules_to_save``, trained
            biases) in a PEFT file: ``base_model.model.`` for peft's tuners, ``base_model.`` for
            its prompt-learning methods.
        command_line: its ``lightning-peft`` options, defaults and one-line description
            (``lightning_peft.core.command_line``); None: not on the command line.
    """

    name: str
    peft_type: str
    config_cls: type
    layers: tuple[type[AdapterLayer], ...]
    write_config: Callable[[nn.Module, Any, list[str]], dict]
    read_config: Callable[[dict, Path], Any]
    scope_text: str | None = field(default=None, kw_only=True)
    label: str | None = field(default=None, kw_only=True)
    scope_note: str = field(default="", kw_only=True)
    select: Callable[[nn.Module, Any], list[str]] | None = None
    file_prefix: str = PEFT_PREFIX
    command_line: CommandLine | None = None

    @property
    def scope(self) -> str:
        """Which modules it adapts (see ``scope`` above)."""
        if self.scope_text is not None:
            return self.scope_text
        ordered = sorted(self.layers, key=lambda layer: layer.over_quantized)  # stable
        kinds = [kind for layer in ordered for kind in layer.adapts_kinds]
        listed = kinds[0] if len(kinds) == 1 else f"{', '.join(kinds[:-1])} and {kinds[-1]}"
        return f"{self.label or self.name} adapts {listed}{self.scope_note}"

    @property
    def mergeable(self) -> bool:
        return all(layer.mergeable for layer in self.layers)

    def layer_class(self, module: nn.Module) -> type[AdapterLayer] | None:
        """The first layer class that adapts ``module`` (peft's dispatch order), or None."""
        return next((cls for cls in self.layers if cls.adapts(module)), None)

    def refusal(self, module: nn.Module, name: str) -> str:
        """The message for a target no layer class adapts."""
        reason = quantized_reason(module)
        if reason is not None:
            return f"target {name!r} is {reason}; {self.scope}: narrow target_modules"
        return f"target {name!r} is a {type(module).__name__}; {self.scope}: narrow target_modules"
