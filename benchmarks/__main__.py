"""Entry point: ``python -m benchmarks [--quick] [--device cpu|cuda] [--threads N] ...``;
``python -m benchmarks qlora [...]`` runs the QLoRA figures (``benchmarks/qlora.py``)."""

import sys

if sys.argv[1:2] == ["qlora"]:
    from benchmarks.qlora import main as qlora_main

    sys.exit(qlora_main(sys.argv[2:]))

from benchmarks.runner import main

sys.exit(main())
