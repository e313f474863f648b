"""Test set-up: one torch thread, and the Triton interpreter when there is no GPU.

``TRITON_INTERPRET=1`` must be set before triton is imported: it makes the Triton kernels run
on CPU tensors, which is how CI checks the Triton path on machines without a GPU.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Small shapes gain nothing from threads; on a shared 2-core machine extra threads only slow.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip by themselves where there is no CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
