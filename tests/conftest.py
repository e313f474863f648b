"""Test set-up: one torch thread, and the Triton interpreter when there is no GPU.

``TRITON_INTERPRET=1`` must be set before triton is imported: it makes the Triton kernels run
on CPU tensors, which is how CI checks the Triton path on machines without a GPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Small shapes gain nothing from threads; on a shared 2-core machine extra threads only slow.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
