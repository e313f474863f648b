"""Where ``BottleneckAdapter`` used to live: it is in ``lightning_peft.methods.bottleneck`` now."""

from lightning_peft.methods.bottleneck import (
    ACTIVATIONS,
    CHILD_NAME,
    BottleneckAdapter,
    attach_bottleneck,
    detach_bottleneck,
    output_features,
)

__all__ = [
    "ACTIVATIONS",
    "CHILD_NAME",
    "BottleneckAdapter",
    "attach_bottleneck",
    "detach_bottleneck",
    "output_features",
]
