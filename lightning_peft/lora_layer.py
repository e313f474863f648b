"""``LoRALinear``: LoRA, rsLoRA and DoRA around a frozen ``nn.Linear`` or transformers ``Conv1D``.

A thin module over ``kernels.lora_linear`` / ``kernels.dora_linear``. It registers the base
layer's own ``weight`` and ``bias`` parameters under the same names, so the model's state-dict
keys for the frozen weights do not change; the adapter adds ``lora_A`` (r, in), ``lora_B``
(out, r) and, for DoRA, ``lora_magnitude`` (out,). GPT-2's ``Conv1D`` stores its weight as
(in, out) (``fan_in_fan_out``); the ops get a transposed view, never a copy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels import dora_linear, dora_weight_norm, lora_linear, weight_row_sq_norm


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): ``y = x @ weight + bias`` with weight (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def keep_adapter_dtype(module: nn.Module, names: list[str], fn, recurse: bool) -> nn.Module:
    """``nn.Module._apply`` that restores the dtype (and exact values) of the named parameters."""
    before = {name: module.get_parameter(name).detach() for name in names}  # old data, no copy
    result = nn.Module._apply(module, fn, recurse)
    for name, old in before.items():
        param = module.get_parameter(name)
        if param.dtype != old.dtype:
            param.data = param.data.to(old.dtype) if old.is_meta else old.to(param.device)
    return result


class LoRALinear(nn.Module):
    """LoRA (DoRA when ``use_dora``) around a frozen linear layer.

    ``y = x Wᵀ + b + s·(dropout(x) Aᵀ) Bᵀ``; DoRA: ``y = (m/n) ⊙ (x (W + sBA)ᵀ) + b`` with
    ``n = ‖W + sBA‖_row`` held constant in backward. ``s = α/r`` (rsLoRA ``α/√r``).

    Args:
        base: the ``nn.Linear`` or ``Conv1D`` to adapt (its parameters are shared, not copied).
        r: rank; lora_alpha: α; dropout: dropout on the adapter input.
        use_rslora, use_dora, init_lora_weights: as in ``LoRAConfig``.
        adapter_dtype: dtype of the adapter parameters (float32 by default, whatever W's).
        backend: the ``kernels`` backend.

    Flags: ``merged`` (the update lives in W; forward is the plain layer), ``disabled`` (the
    adapter is skipped). ``merge()`` / ``unmerge()`` are idempotent.
    """

    def __init__(
        self,
        base: nn.Module,
        r: int,
        lora_alpha: float,
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        init_lora_weights: bool | str = True,
        adapter_dtype: torch.dtype = torch.float32,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if not is_linear_like(base):
            raise TypeError(f"LoRALinear adapts nn.Linear or Conv1D, got {type(base).__name__}")
        if r < 1:
            raise ValueError(f"rank r must be >= 1, got {r}")
        self.fan_in_fan_out = is_conv1d(base)
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        object.__setattr__(self, "base_module", base)  # what unload() puts back; not a child
        self.out_features, self.in_features = self.weight_out_in().shape
        self.r, self.lora_alpha, self.dropout_p = r, lora_alpha, float(dropout)
        self.use_rslora, self.use_dora, self.backend = use_rslora, use_dora, backend
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        factory = {"device": self.weight.device, "dtype": adapter_dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.lora_magnitude = (
            nn.Parameter(torch.empty(self.out_features, **factory)) if use_dora else None
        )
        self.merged = False
        self.disabled = False
        self._merged_norm: Tensor | None = None  # DoRA: the norm used by merge(), for unmerge()
        self._sq_norm_cache: tuple[tuple, Tensor] | None = None
        self.reset_adapter_parameters(init_lora_weights)
        self.train(base.training)

    # -- weights --------------------------------------------------------------------------------

    def weight_out_in(self) -> Tensor:
        """W as (out, in): the weight itself, or a transposed view for ``Conv1D``."""
        return self.weight.T if self.fan_in_fan_out else self.weight

    def adapter_parameter_names(self) -> list[str]:
        return ["lora_A", "lora_B"] + (["lora_magnitude"] if self.use_dora else [])

    def _apply(self, fn, recurse=True):
        # Adapters stay in their configured dtype through model.to(dtype) / .half() / a
        # Lightning "bf16-true" conversion: they follow device moves only.
        return keep_adapter_dtype(self, self.adapter_parameter_names(), fn, recurse)

    @torch.no_grad()
    def reset_adapter_parameters(self, init_lora_weights: bool | str = True) -> None:
        """Initialise A, B (and m) as peft does; ``"pissa"`` also replaces W by its residual."""
        if init_lora_weights == "pissa":
            self._pissa_init()
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            if init_lora_weights == "gaussian":
                nn.init.normal_(self.lora_A, std=1 / self.r)
            if init_lora_weights is False:
                nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
            else:
                nn.init.zeros_(self.lora_B)
        if self.use_dora:
            self.lora_magnitude.copy_(self._weight_norm().to(self.lora_magnitude.dtype))

    def _pissa_init(self) -> None:
        """PiSSA (Meng et al. 2024): A, B from the top-r SVD of W; W ← W − s·B A."""
        weight = self.weight_out_in()
        if self.r > min(weight.shape):
            raise ValueError(f"pissa needs r <= min(out, in) = {min(weight.shape)}, got {self.r}")
        u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
        root = (s[: self.r] / self.scaling).sqrt()
        self.lora_A.copy_(root[:, None] * vh[: self.r])
        self.lora_B.copy_(u[:, : self.r] * root[None, :])
        residual = weight.float() - self.scaling * (self.lora_B.float() @ self.lora_A.float())
        weight.copy_(residual.to(weight.dtype))

    def _weight_sq_norm(self) -> Tensor:
        """‖W_i‖² (out,) in at least float32, cached until W changes (in place or replaced)."""
        key = (self.weight.data_ptr(), self.weight._version, self.weight.device)
        if self._sq_norm_cache is None or self._sq_norm_cache[0] != key:
            self._sq_norm_cache = (key, weight_row_sq_norm(self.weight_out_in()))
        return self._sq_norm_cache[1]

    def _weight_norm(self) -> Tensor:
        """DoRA's n = ‖W + sBA‖_row (out,) in at least float32."""
        weight = self.weight_out_in()
        lora_A, lora_B = self.lora_A.to(weight.dtype), self.lora_B.to(weight.dtype)
        return dora_weight_norm(weight, lora_A, lora_B, self.scaling, self._weight_sq_norm())

    # -- forward --------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out).

        The adapters keep their own dtype (float32 on a bfloat16 base: ``kernels`` runs the
        adapter branch in it); under autocast ``kernels`` casts the base operands, as
        ``F.linear`` would.
        """
        # detach(): W is frozen; under FSDP1 (use_orig_params) it arrives as a view of a flat
        # parameter that requires grad because the adapters in the same unit do.
        weight = self.weight_out_in().detach()
        if self.disabled or self.merged:
            return F.linear(x, weight, self.bias)
        if not self.use_dora:
            return lora_linear(
                x,
                weight,
                self.bias,
                self.lora_A,
                self.lora_B,
                self.scaling,
                self.dropout_p,
                training=self.training,
                backend=self.backend,
            )
        return dora_linear(
            x,
            weight,
            self.bias,
            self.lora_A,
            self.lora_B,
            self.lora_magnitude,
            self.scaling,
            self.dropout_p,
            training=self.training,
            backend=self.backend,
            weight_sq_norm=self._weight_sq_norm(),
        )

    # -- merge ----------------------------------------------------------------------------------

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """``s·B A`` (out, in) in float32 (float64 for float64 adapters)."""
        dtype = torch.promote_types(self.lora_A.dtype, torch.float32)
        return self.scaling * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into W (``W ← W + sBA``; DoRA ``W ← (m/n) ⊙ (W + sBA)``)."""
        if self.merged:
            return
        weight = self.weight_out_in()
        merged = weight.to(torch.promote_types(weight.dtype, torch.float32)) + self.delta_weight()
        if self.use_dora:
            self._merged_norm = self._weight_norm()
            merged *= (self.lora_magnitude.to(merged.dtype) / self._merged_norm)[:, None]
        weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge()`` (exact up to the rounding of W's dtype)."""
        if not self.merged:
            return
        weight = self.weight_out_in()
        restored = weight.to(torch.promote_types(weight.dtype, torch.float32))
        if self.use_dora:
            magnitude = self.lora_magnitude.to(restored.dtype)
            if (magnitude == 0).any():
                raise ValueError("cannot unmerge DoRA: a magnitude entry is 0, W is lost there")
            restored *= (self._merged_norm.to(restored.dtype) / magnitude)[:, None]
        weight.copy_(restored - self.delta_weight())
        self._merged_norm = None
        self.merged = False

    def extra_repr(self) -> str:
        kind = "DoRA" if self.use_dora else "LoRA"
        return (
            f"{kind}: in={self.in_features}, out={self.out_features}, r={self.r}, "
            f"alpha={self.lora_alpha}, scaling={self.scaling:.4g}, dropout={self.dropout_p}, "
            f"bias={self.bias is not None}, fan_in_fan_out={self.fan_in_fan_out}"
        )
