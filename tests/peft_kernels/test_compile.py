"""``torch.compile(fullgraph=True)`` traces models that use the ops, with no graph break."""

import pytest
import torch
from torch import nn

from peft_kernels import dora_linear, lora_linear
from tests.helpers.reference import NEEDS_TRITON


class TwoAdaptedLayers(nn.Module):
    def __init__(self, backend: str, dropout_p: float):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.backend, self.dropout_p = backend, dropout_p
        self.w1 = nn.Parameter(torch.randn(24, 16, generator=gen), requires_grad=False)
        self.w2 = nn.Parameter(torch.randn(8, 24, generator=gen), requires_grad=False)
        self.b1 = nn.Parameter(torch.randn(24, generator=gen))
        self.a1 = nn.Parameter(torch.randn(4, 16, generator=gen))
        self.B1 = nn.Parameter(torch.randn(24, 4, generator=gen))
        self.a2 = nn.Parameter(torch.randn(2, 24, generator=gen))
        self.B2 = nn.Parameter(torch.randn(8, 2, generator=gen))
        self.m2 = nn.Parameter(torch.rand(8, generator=gen) + 1)

    def forward(self, x):
        h = lora_linear(
            x,
            self.w1,
            self.b1,
            self.a1,
            self.B1,
            0.5,
            self.dropout_p,
            training=self.training,
            backend=self.backend,
        )
        h = torch.relu(h)
        return dora_linear(
            h,
            self.w2,
            None,
            self.a2,
            self.B2,
            self.m2,
            0.5,
            self.dropout_p,
            training=self.training,
            backend=self.backend,
        )


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize(
    "backend",
    [
        "torch",
        pytest.param("triton", marks=NEEDS_TRITON),
    ],
)
def test_fullgraph_compile_matches_eager(backend, dropout_p):
    torch._dynamo.reset()
    model = TwoAdaptedLayers(backend, dropout_p)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 5, 16, requires_grad=True)
    outs = []
    for run in (model, compiled):
        torch.manual_seed(0)
        y = run(x)
        y.square().sum().backward()
        outs.append(
            [
                y.detach(),
                x.grad.clone(),
                *[p.grad.clone() for p in model.parameters() if p.requires_grad],
            ]
        )
        x.grad = None
        model.zero_grad()
    for eager, comp in zip(*outs, strict=True):
        torch.testing.assert_close(comp, eager)
