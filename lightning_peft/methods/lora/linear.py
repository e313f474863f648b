"""LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685), rsLoRA, and DoRA as a variant
(Liu et al. 2024, https://arxiv.org/abs/2402.09353), with PiSSA and OLoRA inits; the ``LORA``
method and its ``adapter_config.json``.

``LoRALinear`` adapts a frozen ``nn.Linear`` or transformers ``Conv1D``; it is a thin module over
``peft_kernels.lora_linear`` / ``dora_linear``. It registers the base layer's own ``weight``
and ``bias`` under the same names, so the frozen state-dict keys do not change; the adapter adds
``lora_A`` (r, in), ``lora_B`` (out, r), ``lora_bias`` (out,) with ``lora_bias=True`` (B's bias,
``y += s·b_B``) and whatever its variant adds (DoRA: ``lora_magnitude`` (out,)). What every LoRA
layer shares, and the LoRA and DoRA variants (peft's ``LoraVariant``), are in ``base``;
convolutions, embeddings, ``nn.MultiheadAttention`` and bitsandbytes layers have their own layer
classes (``conv``, ``embedding``, ``mha``, ``quantized``), all in
``LORA.layers``. GPT-2's ``Conv1D`` stores its weight as (in, out) (``fan_in_fan_out``); the ops
get a transposed view, never a copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_peft.core.adapter import (
    is_conv1d,
    is_linear_like,
    quantized_reason,
)
from lightning_peft.methods.lora.base import (
    LORA_VARIANT,
    DoRAVariant,
    LoRALayer,
    LoRAVariant,
    add_lora_bias,
    variant_for,
)
from lightning_peft.methods.lora.config import (
    REWRITES_BASE,
    LoRAConfig,
)
from peft_kernels import (
    RowGroups,
    dora_linear,
    dora_weight_norm,
    grouped_lora_delta,
    grouped_lora_linear,
    lora_delta,
    lora_linear,
    pad_factors,
    weight_row_sq_norm,
)

__all__ = ["DoRAVariant", "LoRALinear", "LoRAVariant", "variant_for"]


def _set_residual(layer: LoRALinear, lora_A: Tensor, lora_B: Tensor, weight32: Tensor) -> None:
    """A, B ← the given factors; W ← W − (s·B) A, computed as peft computes it (float32)."""
    layer.lora_A.copy_(lora_A)
    layer.lora_B.copy_(lora_B)
    weight = layer.weight_out_in()
    residual = weight32 - (layer.scaling * layer.lora_B.to(weight32.dtype)) @ layer.lora_A.to(
        weight32.dtype
    )
    weight.copy_(residual.to(weight.dtype))


def _init_pissa(layer: LoRALinear) -> None:
    """PiSSA (Meng et al. 2024): A, B from the top-r SVD of W; W ← W − s·B A."""
    weight32 = layer.weight_out_in().to(torch.promote_types(layer.weight.dtype, torch.float32))
    u, s, vh = torch.linalg.svd(weight32, full_matrices=False)
    root = (s[: layer.r] / layer.scaling).sqrt()
    _set_residual(layer, root[:, None] * vh[: layer.r], u[:, : layer.r] * root[None, :], weight32)


def _init_olora(layer: LoRALinear) -> None:
    """OLoRA (Büyükakyüz 2024): W = QR; A = R[:r], B = Q[:, :r]; W ← W − s·B A."""
    weight32 = layer.weight_out_in().to(torch.promote_types(layer.weight.dtype, torch.float32))
    q, r = torch.linalg.qr(weight32)
    _set_residual(layer, r[: layer.r], q[:, : layer.r], weight32)


REWRITING_INITS = {"pissa": _init_pissa, "olora": _init_olora}


assert set(REWRITING_INITS) == set(REWRITES_BASE)


_KEPT_FACTORS = "_kept_mixed_factors"  # (tensors, versions, scalings, stacked): mixed_factors


def _stack_factors(layers: list, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The layers' factors stacked (padded when ranks differ) and their scalings (K,)."""
    As, Bs = [layer.lora_A for layer in layers], [layer.lora_B for layer in layers]
    if all(a.shape[0] == As[0].shape[0] for a in As):  # one rank: no padding, no checks
        lora_A, lora_B = torch.stack(As), torch.stack(Bs)
    else:
        lora_A, lora_B = pad_factors(As, Bs)
    scales = [layer.scaling for layer in layers]
    return lora_A, lora_B, torch.tensor(scales, dtype=lora_A.dtype, device=device)


def _factor_pair(layer: LoRALinear) -> tuple[Tensor, Tensor]:
    """``(lora_A, lora_B)`` read from the parameter dict (``nn.Module.__getattr__`` costs ~1 µs
    a call: a mixed batch reads 2K of them per layer per call), else as attributes."""
    params = layer._parameters
    lora_A, lora_B = params.get("lora_A"), params.get("lora_B")
    if lora_A is None or lora_B is None:
        return layer.lora_A, layer.lora_B
    return lora_A, lora_B


def _dropped_rows(flat: Tensor, probabilities: list[float], local: Tensor) -> Tensor:
    """Dropout on the rows (N, in) for a mixed batch: one mask for every row when the adapters
    share p (peft's per-adapter modules draw one each; the rows are disjoint, so the law is the
    same), else each row at its adapter's p (the base rows at 0, their delta is 0 anyway)."""
    if not any(probabilities):
        return flat
    if len(set(probabilities)) == 1:
        return F.dropout(flat, probabilities[0], training=True)
    table = torch.tensor([*probabilities, 0.0], dtype=flat.dtype, device=flat.device)
    p = table[local].unsqueeze(1)  # local -1 reads the last entry: 0
    keep = torch.rand_like(flat) >= p
    return flat * keep / (1 - p)


class LoRALinear(LoRALayer):
    """LoRA (DoRA with ``use_dora``) around a frozen linear layer.

    ``y = x Wᵀ + b + s·(dropout(x) Aᵀ) Bᵀ``; DoRA: ``y = (m/n) ⊙ (x (W + sBA)ᵀ) + b`` with
    ``n = ‖W + sBA‖_row`` held constant in backward. ``s = α/r`` (rsLoRA ``α/√r``).

    Args (as ``LoRALayer``): base (the ``nn.Linear`` or ``Conv1D`` to adapt), r, lora_alpha,
    dropout, use_rslora, use_dora, lora_bias, init_lora_weights (also ``"pissa"`` and
    ``"olora"``, which replace W by its residual), adapter_dtype, backend.

    Flags: ``merged`` (the update lives in W; forward is the plain layer), ``disabled`` (the
    adapter is skipped). ``merge()`` / ``unmerge()`` are idempotent.
    """

    adapts_kinds = ("nn.Linear", "Conv1D")

    # -- declarations ---------------------------------------------------------------------------

    @classmethod
    def adapts(cls, module: nn.Module) -> bool:
        return is_linear_like(module) and quantized_reason(module) is None

    @classmethod
    def base_refusal(cls, base: nn.Module) -> str | None:
        if cls.adapts(base):
            return None
        reason = quantized_reason(base)
        return f"LoRALinear adapts nn.Linear or Conv1D, got {type(base).__name__}" + (
            f": {reason}" if reason else ""
        )

    @staticmethod
    def weight_out_in_of(module: nn.Module) -> Tensor:
        """A linear-like module's W as (out, in) (a transposed view for ``Conv1D``)."""
        return module.weight.T if is_conv1d(module) else module.weight

    @classmethod
    def out_in_of(cls, module: nn.Module) -> tuple[int, int]:
        return tuple(cls.weight_out_in_of(module).shape)

    @classmethod
    def weight_sq_norm_of(cls, module: nn.Module) -> Tensor:
        return weight_row_sq_norm(cls.weight_out_in_of(module))

    @classmethod
    def check_module(cls, module: nn.Module, config: LoRAConfig, name: str, rank: int) -> None:
        init = config.init_lora_weights
        if init in REWRITES_BASE and rank > min(module.weight.shape):
            raise ValueError(
                f"{init} needs r <= min(out, in) = {min(module.weight.shape)} at {name!r}, "
                f"got {rank}"
            )
        if init == "olora" and is_conv1d(module):
            raise ValueError(
                f"olora on {name!r}, a Conv1D (weight stored as (in, out)): peft decomposes the "
                "stored matrix without transposing it, so no result here would match peft's"
            )

    def describe(self) -> tuple[str, str, int]:
        return self.variant.name, f"{self.in_features}->{self.out_features}", self.r

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fan_in_fan_out={self.fan_in_fan_out}"

    # -- weights --------------------------------------------------------------------------------

    def share_base(self, base: nn.Module) -> None:
        super().share_base(base)
        self.fan_in_fan_out = is_conv1d(base)  # W stored as (in, out): GPT-2's Conv1D
        self.out_features, self.in_features = self.out_in_of(base)

    def weight_out_in(self) -> Tensor:
        """W as (out, in): the weight itself, or a transposed view for ``Conv1D``."""
        return self.weight.T if self.fan_in_fan_out else self.weight

    merge_view = weight_out_in

    def compute_weight_sq_norm(self) -> Tensor:
        return weight_row_sq_norm(self.weight_out_in())

    def init_factors(self, init_lora_weights: bool | str) -> None:
        if init_lora_weights in REWRITING_INITS:
            REWRITING_INITS[init_lora_weights](self)
        else:
            super().init_factors(init_lora_weights)

    def dora_norm(self, weight_sq_norm: Tensor) -> Tensor:
        """n = ‖W + sBA‖_row (out,) in at least float32."""
        return dora_weight_norm(
            self.weight_out_in(), self.lora_A, self.lora_B, self.scaling, weight_sq_norm
        )

    # -- forward --------------------------------------------------------------------------------
    # x (..., in) -> (..., out). The adapters keep their own dtype (float32 on a bfloat16 base:
    # ``peft_kernels`` runs the adapter branch in it); under autocast it casts the base
    # operands, as ``F.linear`` would. detach(): W is frozen; under FSDP1 (use_orig_params) it
    # arrives as a view of a flat parameter that requires grad because the adapters in the same
    # unit do. ``lora_output`` / ``dora_output`` run once per adapted layer per decoded token:
    # ``weight_out_in()`` is written out there, one Python call less.

    def base_output(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight_out_in().detach(), self.bias)

    def lora_output(self, x: Tensor) -> Tensor:
        weight = (self.weight.T if self.fan_in_fan_out else self.weight).detach()
        bias = self.bias
        if self.lora_bias is not None:
            bias = add_lora_bias(bias, self.lora_bias, self.scaling, weight.dtype)
        return lora_linear(
            x,
            weight,
            bias,
            self.lora_A,
            self.lora_B,
            self.scaling,
            self.dropout_p,
            training=self.training,
            backend=self.backend,
        )

    def adapter_delta(self, x: Tensor) -> Tensor:
        """``s·(dropout(x) Aᵀ) Bᵀ (+ s·b_B)`` for LoRA, in x's dtype; DoRA as ``LoRALayer``."""
        if self.variant is not LORA_VARIANT:
            return super().adapter_delta(x)
        delta = lora_delta(
            x.to(self.lora_A.dtype),
            self.lora_A,
            self.lora_B,
            self.scaling,
            self.dropout_p,
            training=self.training,
            backend=self.backend,
        )
        if self.lora_bias is not None:
            delta = delta + self.scaling * self.lora_bias
        return delta.to(x.dtype)

    # -- mixed-adapter batches ------------------------------------------------------------------

    @staticmethod
    def grouped_refusal(layers: list[LoRALinear]) -> str | None:
        """Why ``mixed_output`` cannot run these adapters in one op (DoRA, ``lora_bias``: the
        per-adapter loop runs them), or None."""
        if any(
            layer.variant is not LORA_VARIANT or layer.lora_bias is not None for layer in layers
        ):
            return "a DoRA adapter or lora_bias"
        return None

    def mixed_output(
        self, x: Tensor, layers: list[LoRALinear], groups: RowGroups, local: Tensor
    ) -> Tensor:
        """A mixed batch through this layer in one grouped op: ``y_i = x_i Wᵀ + b +
        s_k·B_k A_k dropout_k(x_i)`` for the flattened row i of adapter k = ``local[i]``
        (-1: the base alone).

        Args:
            x: (..., in); its leading dimensions flattened are the N rows.
            layers: the K plain-LoRA layers on this base module (this one possibly among them),
                ranks that may differ (zero-padded, ``pad_factors``).
            groups: every flattened row grouped by adapter (the batch's, made once for all
                layers); local: (N,) each row's adapter (for per-adapter dropout).

        Without dropout, ``peft_kernels.grouped_lora_linear`` (the base product with the
        grouped delta added into it in place); with dropout, the base product plus
        ``grouped_lora_delta`` of the dropped rows.
        """
        weight = (self.weight.T if self.fan_in_fan_out else self.weight).detach()
        lora_A, lora_B, scaling = self.mixed_factors(layers, x.device)
        probabilities = [layer.dropout_p for layer in layers]
        if not (self.training and any(probabilities)):
            return grouped_lora_linear(
                x, weight, self.bias, lora_A, lora_B, scaling, groups, backend=self.backend
            )
        base = F.linear(x, weight, self.bias)
        flat = _dropped_rows(x.reshape(-1, x.shape[-1]), probabilities, local)
        delta = grouped_lora_delta(
            flat, lora_A, lora_B, scaling, groups.offsets, groups.rows, backend=self.backend
        )
        # in place: F.linear's backward does not need its output, and base is ours alone
        flat_base = base.reshape(-1, base.shape[-1])
        if groups.rows is None:  # the rows in adapter order already
            flat_base.add_(delta.to(base.dtype))
        else:
            flat_base.index_add_(0, groups.rows, delta.to(base.dtype))
        return base

    def mixed_factors(
        self, layers: list[LoRALinear], device: torch.device
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(lora_A (K, r, in), lora_B (K, out, r), scaling (K,))`` of ``layers``, stacked
        (zero-padded where ranks differ, ``pad_factors``).

        While autograd records nothing through the factors (inference, decoding under
        ``no_grad``), the last stack is kept on this layer and reused as long as the same
        factor tensors, unchanged (version counters), and the same scalings come again:
        one stack per layer for a run of batches and tokens instead of one per call (storage,
        dtype or device changed by ``.to()``: a new stack). It holds one more copy of those
        adapters' factors (dropped on the next stack made here)."""
        tensors = [t for layer in layers for t in _factor_pair(layer)]
        if (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) or (
            torch.compiler.is_compiling()
        ):
            return _stack_factors(layers, device)
        # new storage (``.to()``, ``.data =``) moves data_ptr; an in-place change, _version
        try:
            versions = [(t._version, t.data_ptr()) for t in tensors]
        except RuntimeError:  # inference tensors (made in inference_mode) have no versions
            return _stack_factors(layers, device)
        scales = [layer.scaling for layer in layers]
        kept = self.__dict__.get(_KEPT_FACTORS)
        if (
            kept is not None
            and len(kept[0]) == len(tensors)
            and all(a is b for a, b in zip(kept[0], tensors, strict=True))
            and kept[1] == versions
            and kept[2] == scales
        ):
            return kept[3]
        stacked = _stack_factors(layers, device)
        self.__dict__[_KEPT_FACTORS] = (tensors, versions, scales, stacked)
        return stacked

    def dora_output(self, x: Tensor, weight_sq_norm: Tensor, weight_norm: Tensor | None) -> Tensor:
        weight = (self.weight.T if self.fan_in_fan_out else self.weight).detach()
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
            weight_sq_norm=weight_sq_norm,
            weight_norm=weight_norm,
        )
