"""Entry point: ``python -m benchmarks [--quick] ...`` (the layer sweeps) or
``python -m benchmarks model [...]`` (the whole-model benchmark),
``python -m benchmarks qlora [...]`` (the QLoRA figures),
``python -m benchmarks moe [...]`` (LoRA on a mixture-of-experts model),
``python -m benchmarks profile [...]`` (one layer's time, op by op) or
``python -m benchmarks grouped [...]`` (mixed adapters vs one adapter)."""

import importlib
import sys

SUBCOMMANDS = {
    "model": "benchmarks.model",
    "qlora": "benchmarks.qlora",
    "moe": "benchmarks.moe",
    "profile": "benchmarks.layer_profile",
    "grouped": "benchmarks.grouped",
}

if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
    sys.exit(importlib.import_module(SUBCOMMANDS[sys.argv[1]]).main(sys.argv[2:]))
sys.exit(importlib.import_module("benchmarks.runner").main())
