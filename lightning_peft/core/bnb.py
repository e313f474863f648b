"""bitsandbytes, the optional quantization backend (``pip install lightning-peft[qlora]``).

- Detection without importing it: ``bitsandbytes_kind`` tells a ``Linear4bit`` (nf4/fp4, with or
  without double quantization; Lightning's ``_NF4DQLinear`` etc. subclass it) or a
  ``Linear8bitLt`` from anything else by the classes' module names.
- ``import_bitsandbytes``: the import, or one line naming the extra when it is missing.
- De-quantization in row chunks: ``quantized_row_sq_norm`` (``‖W_i‖²``, cached by DoRA) and
  ``quantized_weight_times`` (``W Mᵀ``, DoRA's ``W Aᵀ``) never hold more than
  ``DEQUANT_CHUNK_ELEMENTS`` de-quantized values at once; ``dequantized_weight`` builds the
  whole matrix on purpose (merging, export).
- ``load_quantized``: a transformers model loaded 4-bit (nf4/fp4) or 8-bit.
- ``quantize_for_precision``: Lightning's ``BitsandbytesPrecision`` order (see its docstring).

"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterator
from types import ModuleType
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_peft.core.errors import InputError

EXTRA_HINT = "pip install lightning-peft[qlora]"


# The most de-quantized values held at once by the row-chunked helpers (16 MiB in float32).
DEQUANT_CHUNK_ELEMENTS = 1 << 22


Kind = Literal["4bit", "8bit"]


_KINDS = {"Linear4bit": "4bit", "Linear8bitLt": "8bit"}


class MissingExtraError(InputError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def import_bitsandbytes() -> ModuleType:
    """``bitsandbytes``, imported.

    Raises:
        MissingExtraError: it is not installed (one line naming the extra).
    """
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError:
        raise MissingExtraError(
            f"quantization needs bitsandbytes, which is not installed: {EXTRA_HINT}"
        ) from None


def bitsandbytes_kind(module: nn.Module) -> Kind | None:
    """``"4bit"`` for a bitsandbytes ``Linear4bit`` (or a subclass), ``"8bit"`` for a
    ``Linear8bitLt``, else None; read from the class hierarchy without importing bitsandbytes."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("bitsandbytes") and cls.__name__ in _KINDS:
            return _KINDS[cls.__name__]
    return None


def unusable_reason(module: nn.Module) -> str | None:
    """Why a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` cannot be adapted as it is, or None."""
    kind = bitsandbytes_kind(module)
    weight = module.weight
    if kind == "4bit" and not getattr(weight, "bnb_quantized", False):
        return (
            f"a bitsandbytes {type(module).__name__} whose weight is not quantized yet "
            "(bitsandbytes quantizes it when the module moves to a device: call "
            "module.to(device) first, or let PEFTCallback do it under BitsandbytesPrecision)"
        )
    if kind == "8bit":
        if getattr(getattr(module, "state", None), "has_fp16_weights", False):
            return (
                f"a bitsandbytes {type(module).__name__} with has_fp16_weights=True (float "
                "weights re-quantized on every forward: bitsandbytes' mixed int8 training, "
                "Lightning's 'int8-training'); adapters need a frozen int8 base: "
                "has_fp16_weights=False (BitsandbytesPrecision('int8'), transformers' "
                "load_in_8bit)"
            )
        if weight.dtype != torch.int8:
            return (
                f"a bitsandbytes {type(module).__name__} whose weight is not quantized yet "
                f"({weight.dtype}; bitsandbytes quantizes it when the module moves to a "
                "device: call module.to(device) first)"
            )
    return None


def disable_cpu_inference_packing(module: nn.Module) -> bool:
    """Stop a ``Linear4bit`` from repacking its weight for bf16 CPU inference; returns the old flag.

    On CPUs with AVX512-BF16, bitsandbytes 0.50's ``Linear4bit.forward`` in eval mode with an
    input that needs no grad rewrites the weight in place into a packed layout and from then on
    computes in bf16 through a kernel without autograd: a later training forward gives no
    gradient to the input (silently; with a bias it raises). Adapted layers train and evaluate
    in turn (Lightning's validation), so they keep the standard layout.
    """
    previous = bool(getattr(module, "support_avx512bf16_for_cpu", False))
    if hasattr(module, "support_avx512bf16_for_cpu"):
        module.support_avx512bf16_for_cpu = False
    return previous


def keep_standard_layout(model: nn.Module) -> None:
    """For every bitsandbytes layer in ``model``: back to the standard layout if an eval forward
    repacked it, and no repacking from now on (``disable_cpu_inference_packing``). Injection
    calls it: an adapted model trains, and its un-adapted quantized layers must pass gradients
    on after a validation pass too. (bitsandbytes 0.50's repacked path also fails outright for
    an output size that is no multiple of 32.)"""
    for module in model.modules():
        if bitsandbytes_kind(module) == "4bit":
            unpack_cpu_inference_layout(module)
            disable_cpu_inference_packing(module)


def unpack_cpu_inference_layout(module: nn.Module) -> None:
    """Return a ``Linear4bit`` weight that an eval forward repacked for CPU inference to the
    standard layout, as bitsandbytes itself does before saving a state dict."""
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        module.quant_state = weight.quant_state


def dequantized_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the weight de-quantizes to: the dtype it had when it was quantized (4-bit), or
    float32 (8-bit: int8 rows times a float32 scale)."""
    if bitsandbytes_kind(module) == "4bit":
        return module.weight.quant_state.dtype
    return torch.float32


def _scale_8bit(module: nn.Module) -> Tensor:
    """The per-row scale ``SCB`` (out,) of a ``Linear8bitLt``: on the weight until the first
    forward, on the module's matmul state after it."""
    scale = getattr(module.weight, "SCB", None)
    return scale if scale is not None else module.state.SCB


def _chunk_rows(module: nn.Module, max_elements: int) -> int:
    """Rows per chunk: whole 4-bit blocks (a block may straddle rows), at most ``max_elements``
    values when the layer allows it."""
    in_features = module.in_features  # the packed weight's shape says nothing
    unit = 1
    if bitsandbytes_kind(module) == "4bit":
        blocksize = module.weight.quant_state.blocksize
        unit = blocksize // math.gcd(in_features, blocksize)
    return max(unit, (max_elements // in_features) // unit * unit)


def dequantized_rows(
    module: nn.Module, max_elements: int = DEQUANT_CHUNK_ELEMENTS
) -> Iterator[tuple[int, Tensor]]:
    """``(first row, W[rows] (rows, in))`` over the de-quantized weight of a bitsandbytes
    ``Linear4bit`` / ``Linear8bitLt``, a chunk at a time, in ``dequantized_dtype``."""
    out_features, in_features = module.out_features, module.in_features
    step = _chunk_rows(module, max_elements)
    weight = module.weight
    if bitsandbytes_kind(module) == "8bit":
        scale = _scale_8bit(module).float().mul(1.0 / 127.0)  # as bitsandbytes' own matmul
        for start in range(0, out_features, step):
            rows = weight.data[start : start + step]
            yield start, rows.float() * scale[start : start + step, None]
        return
    import_bitsandbytes()  # registers torch.ops.bitsandbytes
    from bitsandbytes.functional import dequantize_blockwise

    state = weight.quant_state
    packed = weight.data.view(torch.uint8).reshape(-1)
    absmax = state.absmax
    if state.nested:  # double quantization: the block scales are themselves 8-bit
        absmax = dequantize_blockwise(state.absmax, state.state2) + state.offset
    absmax = absmax.float()
    blocksize = state.blocksize
    for start in range(0, out_features, step):
        stop = min(start + step, out_features)
        first, last = start * in_features, stop * in_features  # element range; first is even
        chunk = torch.ops.bitsandbytes.dequantize_4bit.default(
            packed[first // 2 : (last + 1) // 2],
            absmax[first // blocksize : -(-last // blocksize)],
            blocksize,
            state.quant_type,
            [stop - start, in_features],
            state.dtype,
        )
        yield start, chunk


@torch.no_grad()
def quantized_row_sq_norm(module: nn.Module) -> Tensor:
    """``‖W_i‖²`` (out,) of the de-quantized weight, in at least float32, chunk by chunk."""
    dtype = torch.promote_types(dequantized_dtype(module), torch.float32)
    return torch.cat(
        [
            torch.linalg.vector_norm(rows, dim=1, dtype=dtype).square()
            for _, rows in dequantized_rows(module)
        ]
    )


@torch.no_grad()
def quantized_weight_times(module: nn.Module, matrix: Tensor) -> Tensor:
    """``W Mᵀ`` (out, k) for ``matrix`` M (k, in) and the de-quantized weight W, chunk by chunk;
    computed in the wider of W's and M's dtypes."""
    dtype = torch.promote_types(dequantized_dtype(module), matrix.dtype)
    right = matrix.detach().to(dtype).T
    return torch.cat([rows.to(dtype) @ right for _, rows in dequantized_rows(module)])


@torch.no_grad()
def dequantized_weight(module: nn.Module, dtype: torch.dtype | None = None) -> Tensor:
    """The whole de-quantized weight (out, in): a full-precision copy, for merging or export."""
    dtype = dtype or dequantized_dtype(module)
    return torch.cat([rows.to(dtype) for _, rows in dequantized_rows(module)])


def parameter_count(parameter: Tensor) -> int:
    """How many values ``parameter`` stands for: a packed 4-bit weight holds two per byte (its
    ``quant_state.shape`` says how many), anything else its ``numel()``."""
    state = getattr(parameter, "quant_state", None)
    if getattr(parameter, "bnb_quantized", False) and state is not None:
        return math.prod(state.shape)
    return parameter.numel()
