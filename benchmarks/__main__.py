"""Entry point: ``python -m benchmarks [--quick] ...`` (the layer sweeps) or
``python -m benchmarks model [...]`` (the whole-model benchmark) or
``python -m benchmarks profile [...]`` (one layer's time, op by op)."""

import sys

if len(sys.argv) > 1 and sys.argv[1] == "model":
    from benchmarks.model import main

    sys.exit(main(sys.argv[2:]))
if len(sys.argv) > 1 and sys.argv[1] == "profile":
    from benchmarks.layer_profile import main

    sys.exit(main(sys.argv[2:]))

from benchmarks.runner import main

sys.exit(main())
