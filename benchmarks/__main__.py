"""Entry point: ``python -m benchmarks [--quick] [--device cpu|cuda] [--threads N] ...``."""

import sys

from benchmarks.runner import main

sys.exit(main())
