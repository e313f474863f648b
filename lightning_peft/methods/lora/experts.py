"""LoRA on the experts of transformers' mixture-of-experts models, applied to the routed tokens
only: no ΔW is materialised.

transformers 5 holds the experts as fused 3-D parameters on one module (``Qwen3MoeExperts``,
``MixtralExperts``, ``GptOssExperts``, ...: ``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I);
(E, in, out) where the class says ``is_transposed``), run by the implementation
``config._experts_implementation`` picks (``integrations/moe.py``: eager, ``batched_mm``,
``grouped_mm``). peft's ``ParamWrapper`` adapts such a parameter per expert by adding ``s·B_e A_e``
to every expert's weight on every forward (``torch.nn.utils.parametrize``: E·out·in floats, and
their gradient). ``LoRAExperts`` instead runs the experts itself, grouped by expert:

1. the (token, k) pairs are sorted by expert once per forward (``offsets``: cumulative ends);
2. ``h = x_g W_upᵀ (+ b) + grouped_lora_delta(x_g, A_up, B_up, s, offsets)``, grouped, with
   ``x_g = x[rows]`` gathered once for both (the base's grouped GEMM saves it for backward
   anyway, so the adapter holds no copy of its own);
3. ``a = _apply_gate(h)`` (the class's own gate: concatenated or interleaved layout, gpt-oss's
   clamped SwiGLU) or ``act_fn(h)`` without a gate;
4. ``y = a W_downᵀ (+ b) + grouped_lora_delta(a, A_down, B_down, s, offsets)``, then the
   optional ``post_expert_norm``, the routing weights and the per-token sum over its k experts,
   as transformers' ``grouped_mm`` implementation does.

An expert's adapter costs what its routed tokens cost (2·r·(in + out) flops per row); experts
that no token reaches cost nothing. The base projections use transformers' ``_grouped_linear``
where it exists (``torch._grouped_mm``; its CPU fallback op under ``torch.compile``). Disabled or
merged, the module's own forward runs (the implementation transformers chose).

Refused by name: expert parallelism (``_is_expert_parallel``), parameters other than the
projections (biases), and what peft's ``ParamWrapper`` refuses (see ``param_layer``).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.methods.lora.param_layer import ParameterLoRA, targeted_parameters
from peft_kernels import grouped_lora_delta

EXPERT_FLAGS = ("num_experts", "has_gate", "has_bias", "is_transposed")


def is_experts_module(module: nn.Module) -> bool:
    """A module built by transformers' ``@use_experts_implementation`` (its flags are set)."""
    return all(hasattr(module, flag) for flag in EXPERT_FLAGS)


def projections(module: nn.Module) -> tuple[str, str]:
    """``(up name, down name)``: ``gate_up_proj`` (``up_proj`` without a gate), ``down_proj``."""
    return ("gate_up_proj" if module.has_gate else "up_proj"), "down_proj"


def experts_refusal(module: nn.Module, name: str, params: list[str]) -> str | None:
    """Why ``LoRAExperts`` cannot adapt ``params`` of ``module``, or None."""
    if not is_experts_module(module):
        return (
            f"{name!r} is a {type(module).__name__}, not a transformers experts module "
            "(@use_experts_implementation); 3-D parameters are adapted on those only"
        )
    if getattr(module, "_is_expert_parallel", False):
        return (
            f"{name!r} runs with expert parallelism (its experts are sharded over devices); "
            "LoRA on its experts is not supported then"
        )
    others = [p for p in params if p not in projections(module)]
    if others:
        return (
            f"target_parameters names '{name}.{others[0]}'; LoRA on experts adapts "
            f"{' and '.join(projections(module))} only (not biases)"
        )
    return None


GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # torch._grouped_mm's


@functools.cache
def _transformers_grouped_linear():
    """transformers' ``_grouped_linear(input, weight, offs, bias, is_transposed)``, or None where
    this transformers has none with that signature."""
    try:
        from transformers.integrations.moe import _grouped_linear
    except ImportError:
        return None
    parameters = inspect.signature(_grouped_linear).parameters
    return _grouped_linear if "is_transposed" in parameters else None


def _grouped_linear(x: Tensor, weight: Tensor, offsets: Tensor, transposed: bool) -> Tensor:
    """Rows of ``x`` (S, in) sorted by expert, each times its expert's weight: (S, out).
    transformers' ``_grouped_linear`` (``torch._grouped_mm``) where it exists and takes the
    dtype; otherwise a loop over the experts (float64, older transformers)."""
    grouped = _transformers_grouped_linear()
    if grouped is not None and x.dtype in GROUPED_MM_DTYPES and weight.dtype == x.dtype:
        return grouped(x, weight, offsets, is_transposed=transposed)
    weight = weight if transposed else weight.transpose(-2, -1)  # (E, in, out)
    pieces, start = [], 0
    for k, end in enumerate(offsets.tolist()):
        pieces.append(x[start:end] @ weight[k].to(x.dtype))
        start = end
    return torch.cat(pieces)


class LoRAExperts(ParameterLoRA):
    """LoRA on the 3-D projections of a transformers experts module, per expert, applied to each
    expert's routed tokens (see the module docstring).

    ``forward(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)``, the
    experts module's own signature. Keys and shapes as peft's: A (r·E, in), B (out, r·E) per
    adapted parameter, nested as ``ParameterLoRA`` says.
    """

    adapts_kinds = ("transformers experts (3-D parameters, target_parameters)",)
    kind = "LoRA (experts)"

    @classmethod
    def experts_of(cls, module: nn.Module, local: str) -> tuple[int, int, int]:
        base = getattr(module, "base_module", module)
        experts, first, second = module._parameters[local].shape
        return (experts, second, first) if base.is_transposed else (experts, first, second)

    @classmethod
    def check(cls, module: nn.Module, config, name: str) -> None:
        reason = experts_refusal(module, name, targeted_parameters(module, name, config))
        if reason is not None:
            raise ValueError(reason)
        super().check(module, config, name)

    # -- forward --------------------------------------------------------------------------------

    def _delta(self, local: str, x: Tensor, offsets: Tensor) -> Tensor:
        dtype = torch.promote_types(x.dtype, self.factors(local)[0].dtype)
        lora_A, lora_B = self.expert_factors(local, dtype)
        if not x.is_cpu:  # the GPU kernels read B_k tiles: laid out per expert, as before
            lora_B = lora_B.contiguous()
        scaling = torch.full((lora_A.shape[0],), self.scalings[local], dtype=dtype, device=x.device)
        return grouped_lora_delta(x, lora_A, lora_B, scaling, offsets, backend=self.backend)

    def forward(self, hidden_states: Tensor, *routing: Any, **named: Any) -> Tensor:
        if self.disabled or self.merged:
            return self.base_module(hidden_states, *routing, **named)
        top_k_index, top_k_weights = (*routing, *named.values())
        base = self.base_module
        if getattr(base, "_is_expert_parallel", False):
            raise ValueError("LoRAExperts does not support expert parallelism")
        up_name, down_name = projections(base)
        experts, top_k = base.num_experts, top_k_index.shape[-1]
        expert_ids = top_k_index.reshape(-1).to(torch.int64)
        sorted_ids, perm = torch.sort(expert_ids)
        rows = perm // top_k  # the token of each sorted (token, k) pair
        counts = torch.zeros(experts, dtype=torch.int64, device=expert_ids.device)
        counts.scatter_add_(0, sorted_ids, torch.ones_like(sorted_ids))
        offsets = torch.cumsum(counts, 0).to(torch.int32)

        routed = hidden_states[rows]  # (S, H): one gather, the base's and the adapter's input
        hidden = _grouped_linear(routed, getattr(self, up_name), offsets, base.is_transposed)
        # In place on the grouped products (their backward needs only their inputs).
        if base.has_bias:
            hidden.add_(getattr(self, f"{up_name}_bias")[sorted_ids])
        if up_name in self.param_names:
            hidden.add_(self._delta(up_name, routed, offsets))
        hidden = base._apply_gate(hidden) if base.has_gate else base.act_fn(hidden)

        out = _grouped_linear(hidden, getattr(self, down_name), offsets, base.is_transposed)
        if base.has_bias:
            out.add_(getattr(self, f"{down_name}_bias")[sorted_ids])
        if down_name in self.param_names:
            out.add_(self._delta(down_name, hidden, offsets))
        if getattr(base, "has_post_expert_norm", False):
            out = base.post_expert_norm(out)

        out = out * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
        inverse = torch.empty_like(perm).scatter_(
            0, perm, torch.arange(len(perm), device=perm.device)
        )
        out = out[inverse].view(-1, top_k, out.shape[-1]).sum(dim=1)
        return out.to(hidden_states.dtype)

    # -- merge ----------------------------------------------------------------------------------

    def delta_weight(self, local: str, dtype: torch.dtype) -> Tensor:
        """``s·B_e A_e`` for every expert, laid out as the parameter: (E, out, in), or
        (E, in, out) for a transposed one."""
        lora_A, lora_B = self.expert_factors(local, dtype)
        delta = self.scalings[local] * torch.bmm(lora_B, lora_A)  # (E, out, in)
        return delta.transpose(1, 2) if self.base_module.is_transposed else delta
