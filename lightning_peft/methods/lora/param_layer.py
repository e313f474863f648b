"""LoRA on ``nn.Parameter``s named by ``target_parameters`` (peft's ``lora.ParamWrapper``): what
the parameter layers share, and ``LoRAParameter`` for 2-D parameters of any module (a router's
``weight``).

A layer adapts one or more parameters of one module. peft wraps each targeted parameter in its
own ``ParamWrapper``, nested in the order the module registers them (the first registered is the
innermost), so its keys are ``<module>.lora_A.weight`` for the outermost wrapper and
``<module>.base_layer.lora_A.weight``, ``<module>.base_layer.base_layer.lora_A.weight`` inward.
Here one layer holds every pair: the pair at depth ``d`` (0 = outermost) is ``lora_A`` /
``lora_B`` with ``d`` prefixes ``base_layer_`` (``base_layer_lora_A``), which ``peft_key`` turns
back into peft's nesting. The base module's own parameters stay registered under their names, so
the frozen state-dict keys do not change.

Shapes as peft's for a parameter of E experts (E = 1 for a 2-D one): A (r·E, in), B (out, r·E);
expert ``e``'s factors are ``A[e·r:(e+1)·r]`` and ``B[:, e::E]`` (``B.view(out, r, E)[..., e]``).
A 2-D parameter (out, in) is adapted as a linear weight: ``W + s·B A``.

As in peft: no DoRA, no ``lora_bias``, no ``lora_dropout`` (the update acts on a weight, so x
cannot be dropped out of it), no PiSSA/OLoRA; refused by name here too. ``bias`` other than
``"none"`` is refused (peft nests the base tensors under ``base_layer`` chains this package does
not write).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_peft.core.adapter import PEFT_PREFIX, AdapterLayer
from lightning_peft.core.config import is_positive_int
from lightning_peft.methods.lora.base import init_factor_pair
from lightning_peft.methods.lora.config import REWRITES_BASE, LoRAConfig, lora_scaling

DEPTH_PREFIX = "base_layer_"
MAX_DEPTH = 4  # parameters one module may have adapted (names declared for LoRA+ and the file)


def pair_names(depth: int) -> tuple[str, str]:
    """``(A name, B name)`` of the factor pair at nesting depth ``depth`` (0 = outermost)."""
    prefix = DEPTH_PREFIX * depth
    return f"{prefix}lora_A", f"{prefix}lora_B"


def targeted_parameters(module: nn.Module, name: str, config: LoRAConfig) -> list[str]:
    """The parameters of ``module`` (at ``name``) that ``config.target_parameters`` names, in the
    module's registration order (peft's rule: ``<name>.<parameter>`` is listed whole or ends with
    ``.<entry>``)."""
    wanted = config.target_parameters or []
    found = []
    for local in module._parameters:
        key = f"{name}.{local}" if name else local
        if key in wanted or any(key.endswith(f".{entry}") for entry in wanted):
            found.append(local)
    return found


class ParameterLoRA(AdapterLayer):
    """What the ``target_parameters`` layers share: the base's parameters under their own names,
    one factor pair per adapted parameter (named by nesting depth), rank/α per parameter from
    ``rank_pattern`` / ``alpha_pattern`` (keyed by ``<module>.<parameter>``), init, merge.

    A subclass declares ``adapts_parameters`` (which modules and parameters) and the forward.
    """

    mergeable = True
    fast_names = tuple(pair_names(d)[1] for d in range(MAX_DEPTH))

    def __init__(self, base: nn.Module, name: str, config: LoRAConfig) -> None:
        super().__init__()
        params = targeted_parameters(base, name, config)
        self.param_names = params
        for local, param in base._parameters.items():
            self.register_parameter(local, param)
        for local, buffer in base._buffers.items():
            self.register_buffer(local, buffer, local not in base._non_persistent_buffers_set)
        for local, child in base._modules.items():  # keys stay <p>.<child>.<...>
            self.add_module(local, child)
        for param in base.parameters():
            param.requires_grad_(False)
        object.__setattr__(self, "base_module", base)  # what unwrap() puts back; not a child
        self.backend = config.backend
        self.ranks, self.alphas, self.scalings = {}, {}, {}
        dtype = getattr(torch, config.adapter_dtype)
        shapes = self.adapter_shapes(base, config, name)
        device = base._parameters[params[0]].device
        for local in params:
            rank, alpha = config.rank_and_alpha(f"{name}.{local}")
            self.ranks[local], self.alphas[local] = rank, alpha
            self.scalings[local] = lora_scaling(rank, alpha, config.use_rslora)
            for factor in self.pair(local):
                tensor = torch.empty(shapes[factor], device=device, dtype=dtype)
                setattr(self, factor, nn.Parameter(tensor))
            with torch.no_grad():
                lora_A, lora_B = self.factors(local)
                init_factor_pair(lora_A, lora_B, config.init_lora_weights, rank)
        self.merged = False
        self.disabled = False
        self.train(base.training)

    # -- declarations ---------------------------------------------------------------------------

    @classmethod
    def adapts(cls, module: nn.Module) -> bool:
        return False  # reached through target_parameters only (``param_targets``)

    @classmethod
    def experts_of(cls, module: nn.Module, local: str) -> tuple[int, int, int]:
        """``(E, out, in)`` of the parameter ``local`` as peft's ``ParamWrapper`` reads it."""
        raise NotImplementedError

    @classmethod
    def check(cls, module: nn.Module, config: LoRAConfig, name: str) -> None:
        params = targeted_parameters(module, name, config)
        if len(params) > MAX_DEPTH:
            raise ValueError(
                f"target_parameters names {len(params)} parameters of {name!r}; at most "
                f"{MAX_DEPTH} parameters of one module can be adapted here"
            )
        label = f"target_parameters on {name!r}"
        refusals = [
            (config.lora_dropout, f"lora_dropout={config.lora_dropout}"),
            (config.use_dora, "use_dora=True"),
            (config.lora_bias, "lora_bias=True"),
            (config.init_lora_weights in REWRITES_BASE, repr(config.init_lora_weights)),
        ]
        for refused, shown in refusals:
            if refused:
                raise ValueError(
                    f"{shown} does not work with {label} ({', '.join(params)}), as in peft "
                    "(lora.ParamWrapper): the update acts on the weight itself; leave the option "
                    "at its default or leave these parameters out"
                )
        if config.bias != "none":
            raise ValueError(
                f"bias={config.bias!r} with {label} is not supported: peft nests the module's "
                "own tensors under base_layer chains this package does not write; use "
                "bias='none'"
            )
        for local in params:
            rank, _ = config.rank_and_alpha(f"{name}.{local}")
            if not is_positive_int(rank):
                raise ValueError(
                    f"rank_pattern gives '{name}.{local}' rank {rank!r}; ranks must be ints >= 1"
                )
            if not module._parameters[local].is_floating_point():
                raise ValueError(
                    f"'{name}.{local}' is a {module._parameters[local].dtype} tensor (quantized); "
                    "LoRA on a parameter needs a float one"
                )

    @classmethod
    def adapter_shapes(cls, module: nn.Module, config: LoRAConfig, name: str) -> dict:
        params = targeted_parameters(module, name, config)
        shapes = {}
        for position, local in enumerate(params):
            rank, _ = config.rank_and_alpha(f"{name}.{local}")
            experts, out_features, in_features = cls.experts_of(module, local)
            a_name, b_name = pair_names(len(params) - 1 - position)
            shapes[a_name] = (rank * experts, in_features)
            shapes[b_name] = (out_features, rank * experts)
        return shapes

    @classmethod
    def build(cls, module: nn.Module, config: LoRAConfig, name: str) -> ParameterLoRA:
        return cls(module, name, config)

    @classmethod
    def saved_name(cls, local_name: str) -> str:
        """``base_layer_base_layer_lora_A`` -> ``base_layer.base_layer.lora_A.weight``; the
        base's own tensors as peft nests them is not known per class (``bias`` is refused)."""
        depth = 0
        while local_name.startswith(DEPTH_PREFIX):
            local_name, depth = local_name.removeprefix(DEPTH_PREFIX), depth + 1
        return "base_layer." * depth + f"{local_name}.weight"

    @classmethod
    def peft_key(cls, layer_path: str, local_name: str) -> str:
        return f"{PEFT_PREFIX}{layer_path}.{cls.saved_name(local_name)}"

    # -- instance -------------------------------------------------------------------------------

    def pair(self, local: str) -> tuple[str, str]:
        """The factor names of the adapted parameter ``local``."""
        position = self.param_names.index(local)
        return pair_names(len(self.param_names) - 1 - position)

    def factors(self, local: str) -> tuple[Tensor, Tensor]:
        a_name, b_name = self.pair(local)
        return getattr(self, a_name), getattr(self, b_name)

    def expert_factors(self, local: str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(A (E, r, in), B (E, out, r))`` of ``local`` in ``dtype`` (differentiable)."""
        lora_A, lora_B = self.factors(local)
        experts = self.experts_of(self, local)[0]
        rank = self.ranks[local]
        a = lora_A.to(dtype).view(experts, rank, lora_A.shape[-1])
        # B_e = B[:, e::E]: a strided view; the grouped op lays it out as it needs (its torch
        # backend folds s into the one copy) and returns dB with these strides, so the gradient
        # lands in B's own layout without a copy.
        b = lora_B.to(dtype).view(lora_B.shape[0], rank, experts).permute(2, 0, 1)
        return a, b

    def adapter_parameter_names(self) -> list[str]:
        return [factor for local in self.param_names for factor in self.pair(local)]

    @property
    def base_layer(self) -> nn.Module:
        return self.base_module

    def unwrap(self) -> nn.Module:
        base = self.base_module
        for local in [*base._parameters, *base._buffers]:
            setattr(base, local, getattr(self, local))
        return base

    # -- merge ----------------------------------------------------------------------------------

    def delta_weight(self, local: str, dtype: torch.dtype) -> Tensor:
        """``s·ΔW`` laid out as the parameter ``local`` (differentiable)."""
        raise NotImplementedError

    @torch.no_grad()
    def _add_deltas(self, sign: float) -> None:
        for local in self.param_names:
            weight = getattr(self, local)
            wide = torch.promote_types(weight.dtype, torch.float32)
            dtype = torch.promote_types(self.factors(local)[0].dtype, wide)
            weight.copy_(weight.to(dtype) + sign * self.delta_weight(local, dtype))

    def merge(self) -> None:
        """``W ← W + s·B A`` for each adapted parameter (per expert for a 3-D one)."""
        if not self.merged:
            self._add_deltas(1.0)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._add_deltas(-1.0)
            self.merged = False

    def describe(self) -> tuple[str, str, int]:
        parts = []
        for local in self.param_names:
            experts, out_features, in_features = self.experts_of(self, local)
            per = f"{experts} experts × " if experts > 1 else ""
            parts.append(f"{local} {per}{in_features}->{out_features} r={self.ranks[local]}")
        return self.kind, ", ".join(parts), max(self.ranks.values())

    kind: ClassVar[str] = "LoRA"

    def extra_repr(self) -> str:
        return self.describe()[1]


class LoRAParameter(ParameterLoRA):
    """LoRA on 2-D parameters (out, in) of any module, e.g. a mixture-of-experts router's
    ``weight`` (E, H): the module's own forward runs with ``W + s·B A`` in place of W
    (``torch.func.functional_call``), as peft's ``ParamWrapper`` does. That materialises ``s·B A``
    (out·in floats: E·H for a router, a few thousand) on every forward: the simplest exact way.
    """

    adapts_kinds = ("2-D parameters (target_parameters)",)
    kind = "LoRA (parameter)"

    @classmethod
    def experts_of(cls, module: nn.Module, local: str) -> tuple[int, int, int]:
        out_features, in_features = module._parameters[local].shape
        return 1, out_features, in_features

    def delta_weight(self, local: str, dtype: torch.dtype) -> Tensor:
        lora_A, lora_B = self.factors(local)
        return self.scalings[local] * (lora_B.to(dtype) @ lora_A.to(dtype))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        weights = {n: p for n, p in self._parameters.items() if p is not None}
        if not (self.disabled or self.merged):
            for local in self.param_names:
                weight = weights[local]
                weights[local] = weight + self.delta_weight(local, weight.dtype)
        for factor in self.adapter_parameter_names():
            del weights[factor]
        return functional_call(self.base_module, weights, args, kwargs)


def check_parameter_shapes(module: nn.Module, name: str, params: list[str], ndim: int) -> None:
    """Refuse a targeted parameter of another rank than ``ndim``, by name."""
    for local in params:
        shape = tuple(module._parameters[local].shape)
        if len(shape) != ndim:
            raise ValueError(
                f"target_parameters: '{name}.{local}' has shape {shape}; LoRA adapts 2-D "
                "parameters (out, in) of any module and 3-D expert parameters of transformers' "
                "mixture-of-experts modules"
            )
        if math.prod(shape) == 0:
            raise ValueError(f"target_parameters: '{name}.{local}' is empty (shape {shape})")
