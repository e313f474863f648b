"""LoRA and DoRA on ``nn.Embedding``: a thin layer over ``peft_kernels.lora_embedding`` /
``peft_kernels.dora_embedding``.

As peft's ``lora.Embedding``: ``lora_embedding_A`` (r, V) and ``lora_embedding_B`` (d, r), saved
under those names; ``y = W[ids] + s·Aᵀ[ids] Bᵀ``, the adapter a gather of A's columns (never a
one-hot product). Init: A = 0, B ~ N(0, 1) (peft's, for ``True`` and ``"gaussian"`` alike);
``False``: both N(0, 1). DoRA's magnitude has one entry per embedding dimension (d,), the norm
over the vocabulary. As in peft there is no dropout on embeddings (``lora_dropout`` acts on the
other layers) and ``lora_bias`` is refused. Embeddings that scale their output by a scalar
``embed_scale`` (transformers' ``*ScaledWordEmbedding``) get the adapter scaled too, as peft does;
other subclasses with their own forward, ``max_norm`` (which renormalises the weights in place on
every lookup) and the inits that rewrite W (PiSSA, OLoRA; peft ignores them for embeddings) are
refused by name. A's gradient is dense whatever the base's ``sparse`` flag (W is frozen: there is
no sparse gradient to make).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_peft.methods.lora.base import LoRALayer
from lightning_peft.methods.lora.config import REWRITES_BASE, LoRAConfig
from peft_kernels import (
    dora_embedding,
    embedding_delta_weight,
    embedding_dora_weight_norm,
    embedding_weight_sq_norm,
    lora_embedding,
)


def embed_scale_of(module: nn.Module) -> Tensor | float | None:
    """The scalar ``embed_scale`` a scaled embedding multiplies its lookup by, or None."""
    scale = getattr(module, "embed_scale", None)
    if isinstance(scale, Tensor) and scale.numel() == 1:
        return scale
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return scale
    return None


class LoRAEmbedding(LoRALayer):
    """LoRA / DoRA around a frozen ``nn.Embedding``.

    Args (as ``LoRALayer``): base, r, lora_alpha, use_rslora, use_dora, init_lora_weights,
    adapter_dtype; ``dropout`` is not applied (peft applies none); no ``lora_bias``.
    """

    adapts_kinds = ("nn.Embedding",)

    factor_names = ("lora_embedding_A", "lora_embedding_B")
    saved_names: ClassVar[dict[str, str]] = {
        "lora_magnitude": "lora_magnitude_vector",
        "weight": "base_layer.weight",
    }
    fast_names = ("lora_embedding_B",)
    row_noun = "embedding dimension (column)"
    dora_axis = 1  # W (V, d): the magnitude scales its columns
    supports_lora_bias = False
    # peft_kernels.dora_embedding takes no precomputed n: each forward computes it.
    reuses_inference_norm = False

    # -- declarations ---------------------------------------------------------------------------

    @classmethod
    def adapts(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    @classmethod
    def factor_shapes(cls, module: nn.Module, rank: int) -> dict[str, tuple[int, ...]]:
        return {
            "lora_embedding_A": (rank, module.num_embeddings),
            "lora_embedding_B": (module.embedding_dim, rank),
        }

    @classmethod
    def magnitude_shape_of(cls, module: nn.Module) -> tuple[int, ...]:
        return (module.embedding_dim,)

    @classmethod
    def weight_sq_norm_of(cls, module: nn.Module) -> Tensor:
        return embedding_weight_sq_norm(module.weight)

    @classmethod
    def check_module(cls, module: nn.Module, config: LoRAConfig, name: str, rank: int) -> None:
        label = f"{name!r} (a {type(module).__name__})"
        if config.lora_bias:
            raise ValueError(
                f"lora_bias is not supported for embeddings ({label}), as in peft: exclude "
                "the module or use lora_bias=False"
            )
        if type(module).forward is not nn.Embedding.forward:
            if getattr(module, "embed_scale", None) is None:
                raise ValueError(
                    f"{label} has its own forward; LoRA computes the lookup from its weight as "
                    "nn.Embedding does (times a scalar embed_scale, for scaled embeddings), "
                    "which would not be this module's output: exclude the module"
                )
            if embed_scale_of(module) is None:
                raise ValueError(
                    f"{label} has an embed_scale that is not a scalar "
                    f"({module.embed_scale!r}); only scalar scales are supported, as in peft"
                )
        if module.max_norm is not None:
            raise ValueError(
                f"{label} has max_norm={module.max_norm}: it renormalises rows of its weight in "
                "place on every lookup, which a frozen weight with a LoRA update cannot follow; "
                "exclude the module"
            )
        if config.init_lora_weights in REWRITES_BASE:
            raise ValueError(
                f"init_lora_weights={config.init_lora_weights!r} is not available for "
                f"embeddings ({label}); peft initialises them as the default there instead: "
                "use True"
            )

    def init_factors(self, init_lora_weights: bool | str) -> None:
        if init_lora_weights in REWRITES_BASE:
            raise ValueError(f"init_lora_weights={init_lora_weights!r} is not for embeddings")
        if init_lora_weights is False:
            nn.init.normal_(self.lora_embedding_A)
        else:  # peft: A = 0, B ~ N(0, 1), for True and "gaussian"
            nn.init.zeros_(self.lora_embedding_A)
        nn.init.normal_(self.lora_embedding_B)

    # -- hooks ----------------------------------------------------------------------------------

    def _lookup_options(self) -> dict:
        base = self.base_module
        return {"padding_idx": base.padding_idx, "scale_grad_by_freq": base.scale_grad_by_freq}

    def _scaled(self, y: Tensor) -> Tensor:
        scale = self._buffers.get("embed_scale")
        if scale is None:
            scale = embed_scale_of(self.base_module)
        if scale is None:
            return y
        return y * (scale.to(y.dtype) if isinstance(scale, Tensor) else scale)

    def lora_output(self, ids: Tensor) -> Tensor:
        """ids (...) -> (..., d) in W's dtype."""
        # detach(): W is frozen (under FSDP1 it can arrive as a view that requires grad).
        with torch.autocast(ids.device.type, enabled=False):
            y = lora_embedding(
                ids, self.weight.detach(), *self.factors(), self.scaling, **self._lookup_options()
            )
        return self._scaled(y)

    def dora_output(self, ids: Tensor, weight_sq_norm: Tensor, weight_norm: None) -> Tensor:
        with torch.autocast(ids.device.type, enabled=False):
            y = dora_embedding(
                ids,
                self.weight.detach(),
                *self.factors(),
                self.lora_magnitude,
                self.scaling,
                weight_sq_norm=weight_sq_norm,
                **self._lookup_options(),
            )
        return self._scaled(y)

    def base_output(self, ids: Tensor) -> Tensor:
        return self._scaled(F.embedding(ids, self.weight, self.base_module.padding_idx))

    def delta_weight(self) -> Tensor:
        """``s·Aᵀ Bᵀ`` (V, d) in float32 (float64 for float64 adapters)."""
        return embedding_delta_weight(*self.factors(), self.scaling)

    def dora_norm(self, weight_sq_norm: Tensor) -> Tensor:
        return embedding_dora_weight_norm(
            self.weight, *self.factors(), self.scaling, weight_sq_norm
        )

    def describe(self) -> tuple[str, str, int]:
        base = self.base_module
        return self.variant.name, f"{base.num_embeddings}x{base.embedding_dim} embedding", self.r
