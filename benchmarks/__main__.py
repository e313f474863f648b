"""Entry point: ``python -m benchmarks [--quick] ...`` (the layer sweeps) or
``python -m benchmarks model [...]`` (the whole-model benchmark),
``python -m benchmarks qlora [...]`` (the QLoRA figures),
``python -m benchmarks moe [...]`` (LoRA on a mixture-of-experts model),
``python -m benchmarks profile [...]`` (one layer's time, op by op),
``python -m benchmarks grouped [...]`` (the grouped op: mixed adapters vs one adapter) or
``python -m benchmarks mixed [...]`` (mixed-adapter batches on a whole model, ours vs peft)."""

import importlib
import sys

SUBCOMMANDS = {
    "model": "benchmarks.model",
    "qlora": "benchmarks.qlora",
    "moe": "benchmarks.moe",
    "profile": "benchmarks.layer_profile",
    "grouped": "benchmarks.grouped",
    "mixed": "benchmarks.mixed",
}

if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
    sys.exit(importlib.import_module(SUBCOMMANDS[sys.argv[1]]).main(sys.argv[2:]))
sys.exit(importlib.import_module("benchmarks.runner").main())
