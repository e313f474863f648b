"""Compile the grouped (SGMV) Triton kernels ahead of time for sm_90 and sm_80, no GPU needed.

Run as a script (``TRITON_INTERPRET=0``; ``--first``: each kernel's first config only), as
``tests/peft_kernels/triton_aot.py`` does for the linear kernels: one JSON line per kernel
variant (tiles, shared memory, whether the PTX has tensor-core instructions and atomics).
Variants: every ``MODE`` of the expand, with and without the row gather and the scale; 16-bit
activations with float32 factors (the mixed-dtype tiles) and 16-bit factors.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
warnings.filterwarnings("ignore")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from peft_kernels import triton_grouped as tg  # noqa: E402

INDEX_POINTERS = {"rows_ptr": "*i64", "offsets_ptr": "*i64", "scale_ptr": "*fp32"}
TILE_POINTERS = {"tile_group_ptr", "tile_start_ptr", "tile_end_ptr"}
UNIT_STRIDES = {
    "_shrink_kernel": ["stride_xc", "stride_tr"],
    "_expand_kernel": ["stride_tr", "stride_on"],
    "_outer_kernel": ["stride_lr", "stride_xn"],
}
# (kernel, flags, pointer -> "act" (activation dtype) or "factor" (factor dtype) or "fp32")
VARIANTS = [
    (tg._shrink_kernel, {"HAS_ROWS": True, "HAS_SCALE": False},
     {"x_ptr": "act", "w_ptr": "factor", "t_ptr": "factor"}),
    (tg._shrink_kernel, {"HAS_ROWS": False, "HAS_SCALE": True},
     {"x_ptr": "act", "w_ptr": "factor", "t_ptr": "factor"}),
    (tg._expand_kernel, {"HAS_SCALE": True, "HAS_BIAS": False, "MODE": 0},
     {"t_ptr": "factor", "v_ptr": "factor", "out_ptr": "act", "bias_ptr": "act"}),
    (tg._expand_kernel, {"HAS_SCALE": False, "HAS_BIAS": False, "MODE": 1},
     {"t_ptr": "factor", "v_ptr": "factor", "out_ptr": "fp32", "bias_ptr": "act"}),
    (tg._expand_kernel, {"HAS_SCALE": True, "HAS_BIAS": True, "MODE": 2},
     {"t_ptr": "factor", "v_ptr": "factor", "out_ptr": "act", "bias_ptr": "act"}),
    (tg._expand_kernel, {"HAS_SCALE": True, "HAS_BIAS": False, "MODE": 3},
     {"t_ptr": "factor", "v_ptr": "factor", "out_ptr": "act", "bias_ptr": "act"}),
    (tg._outer_kernel, {"HAS_ROWS": True, "HAS_SCALE": False},
     {"l_ptr": "factor", "x_ptr": "act", "out_ptr": "factor"}),
    (tg._outer_kernel, {"HAS_ROWS": False, "HAS_SCALE": True},
     {"l_ptr": "factor", "x_ptr": "act", "out_ptr": "factor"}),
]  # fmt: skip
# (compute capability, activation dtype, factor dtype)
TARGETS = [(90, "bf16", "bf16"), (90, "bf16", "fp32"), (80, "fp16", "fp16")]


def compile_kernel(autotuned, flags, pointers, capability, act, factor, config):
    fn = autotuned.fn
    constants = {**config.kwargs, **flags, "DOT_PRECISION": "ieee", "BLOCK_R": 16}
    if "BLOCK_M" not in constants:
        constants["BLOCK_M"] = 64
    constants.update(dict.fromkeys(UNIT_STRIDES[fn.__name__], 1))
    dtypes = {"act": act, "factor": factor, "fp32": "fp32"}
    signature = {}
    for name in fn.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in INDEX_POINTERS:
            signature[name] = INDEX_POINTERS[name]
        elif name in TILE_POINTERS:
            signature[name] = "*i32"
        elif name.endswith("_ptr"):
            signature[name] = f"*{dtypes[pointers[name]]}"
        else:
            signature[name] = "i32"
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if signature[name].startswith("*") or (signature[name] == "i32" and name != "K")
    }
    source = ASTSource(fn, signature, constexprs=constants, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


def main() -> None:
    for capability, act, factor in TARGETS:
        for autotuned, flags, pointers in VARIANTS:
            for config in autotuned.configs[: 1 if "--first" in sys.argv else None]:
                compiled = compile_kernel(
                    autotuned, flags, pointers, capability, act, factor, config
                )
                ptx = compiled.asm["ptx"]
                record = {
                    "kernel": autotuned.fn.__name__,
                    "flags": flags,
                    "capability": capability,
                    "dtypes": [act, factor],
                    "config": {**config.kwargs, "num_stages": config.num_stages},
                    "shared_bytes": compiled.metadata.shared,
                    "cubin_bytes": len(compiled.asm["cubin"]),
                    "wgmma": "wgmma.mma_async" in ptx,
                    "mma_sync": "mma.sync" in ptx,
                    "atomics": "atom.global" in ptx,
                }
                print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
