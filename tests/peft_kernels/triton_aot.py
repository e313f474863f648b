"""Compile the Triton kernels ahead of time for real GPUs, no GPU needed (run as a script).

The interpreter (``TRITON_INTERPRET=1``) checks what the kernels compute, but it accepts code
that the GPU compiler would reject and says nothing about how it compiles. This script runs the
real pipeline (Triton → PTX → cubin with the ``ptxas`` that ships with triton) for Hopper
(sm_90) and Ampere (sm_80) and prints one JSON line per kernel variant: its tiles, its shared
memory (which grows with the stages the K loop was pipelined into) and whether the PTX uses
tensor-core instructions and asynchronous copies.

Arguments are specialised as the JIT specialises row-major tensors of realistic sizes: unit
strides become constants, pointers and sizes are taken as multiples of 16.

Usage: ``TRITON_INTERPRET=0 python tests/triton_aot.py``
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings

os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
warnings.filterwarnings("ignore")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from peft_kernels import triton_linear as tlin  # noqa: E402

FP32_BUFFERS = {"grad_u_ptr", "grad_b_ptr", "grad_mag_ptr", "grad_bias_ptr", "grad_a_ptr"}
# Strides that are 1 for row-major operands (the JIT turns an int argument equal to 1 into a
# constant), per kernel.
UNIT_STRIDES = {
    "_lora_down_kernel": ["stride_xk", "stride_ak"],
    "_fused_linear_fwd_kernel": ["stride_xk", "stride_wk", "stride_ur", "stride_br"],
    "_lora_bwd_dy_kernel": ["stride_dyn", "stride_br", "stride_ur", "stride_basen"],
    "_lora_grad_x_kernel": ["stride_dyk", "stride_wn", "stride_an"],
    "_lora_grad_a_kernel": ["stride_xk"],
}
# (kernel, flags) pairs: the plain LoRA variant and the one with every feature switched on.
VARIANTS = [
    (tlin._lora_down_kernel, {"HAS_DROPOUT": True}),
    (tlin._fused_linear_fwd_kernel, {"HAS_BIAS": True, "DORA": False, "HAS_DROPOUT": False}),
    (tlin._fused_linear_fwd_kernel, {"HAS_BIAS": True, "DORA": True, "HAS_DROPOUT": True}),
    (tlin._lora_bwd_dy_kernel, {"DORA": False, "HAS_BIAS_GRAD": False}),
    (tlin._lora_bwd_dy_kernel, {"DORA": True, "HAS_BIAS_GRAD": True}),
    (tlin._lora_grad_x_kernel, {"DORA": False, "HAS_DROPOUT": False}),
    (tlin._lora_grad_x_kernel, {"DORA": True, "HAS_DROPOUT": True}),
    (tlin._lora_grad_a_kernel, {"HAS_DROPOUT": True}),
]
# (compute capability, activation dtype): bf16 on Hopper, fp16 on Ampere.
TARGETS = [(90, "bf16"), (80, "fp16")]


def compile_kernel(autotuned, flags: dict, capability: int, dtype: str, config: triton.Config):
    """triton.compile one autotuned kernel for ``sm_<capability>`` with ``config``'s tiles."""
    fn = autotuned.fn
    constants = {**config.kwargs, **flags, "DOT_PRECISION": "ieee", "BLOCK_R": 16}
    constants.update(dict.fromkeys(UNIT_STRIDES[fn.__name__], 1))
    signature = {}
    for name in fn.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name == "seed_ptr":
            signature[name] = "*i64"
        elif name == "norm_ptr" or name in FP32_BUFFERS:
            signature[name] = "*fp32"
        elif name.endswith("_ptr"):
            signature[name] = f"*{dtype}"
        elif name in ("scaling", "p"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if signature[name] == "i32" or signature[name].startswith("*")
    }
    source = ASTSource(fn, signature, constexprs=constants, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


def tile_elements(config: triton.Config) -> int:
    return math.prod(v for k, v in config.kwargs.items() if k.startswith("BLOCK_"))


def main() -> None:
    for capability, dtype in TARGETS:
        for autotuned, flags in VARIANTS:
            config = min(autotuned.configs, key=tile_elements)  # the quickest to compile
            compiled = compile_kernel(autotuned, flags, capability, dtype, config)
            ptx = compiled.asm["ptx"]
            record = {
                "kernel": autotuned.fn.__name__,
                "flags": flags,
                "capability": capability,
                "dtype": dtype,
                "config": {**config.kwargs, "num_stages": config.num_stages},
                "shared_bytes": compiled.metadata.shared,
                "cubin_bytes": len(compiled.asm["cubin"]),
                "wgmma": "wgmma.mma_async" in ptx,
                "mma_sync": "mma.sync" in ptx,
                "cp_async": "cp.async" in ptx,
            }
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
