"""Small models with the layer types and shapes of peft's ``tests/test_custom_models.py``
(``MLP``, ``EmbConv1D``, ``Conv1d``, ``Conv2d``, ``Conv2dGroups``, ``Conv2dGroups2``, ``Conv3d``,
``MHA``), written here, each with an input for it. ``CUSTOM_MODELS[model_id]()`` returns
``(model, input)``, the same for every call (seeded)."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, bias: bool = True):
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2, bias=bias)

    def forward(self, x):
        return torch.log_softmax(self.lin1(self.drop(torch.relu(self.lin0(x)))), dim=-1)


class EmbConv1D(nn.Module):
    """An embedding (100 × 5) and transformers' ``Conv1D`` (weight stored (in, out))."""

    def __init__(self):
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.emb = nn.Embedding(100, 5)
        self.conv1d = Conv1D(1, 5)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, ids):
        x = torch.relu(self.conv1d(self.emb(ids))).flatten(1)
        return torch.log_softmax(self.lin0(x), dim=-1)


class Conv1dModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1d = nn.Conv1d(1, 1, 2)
        self.lin0 = nn.Linear(9, 2)

    def forward(self, x):
        x = torch.relu(self.conv1d(x.reshape(-1, 1, 10))).flatten(1)
        return torch.log_softmax(self.lin0(x), dim=-1)


class Conv2dModel(nn.Module):
    def __init__(self, bias: bool = True):
        super().__init__()
        self.conv2d = nn.Conv2d(5, 10, 3, bias=bias)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, x):
        x = torch.relu(self.conv2d(x.reshape(-1, 5, 3, 3))).flatten(1)
        return torch.log_softmax(self.lin0(x), dim=-1)


class Conv2dGroupsModel(nn.Module):
    """groups=8, so that peft's default r=8 is a multiple of it."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(90, 288)
        self.conv2d = nn.Conv2d(16, 16, 3, groups=8)
        self.lin1 = nn.Linear(16, 2)

    def forward(self, x):
        x = self.lin0(x.flatten()).reshape(2, 16, 3, 3)
        x = torch.relu(self.conv2d(x)).flatten(1)
        return torch.log_softmax(self.lin1(x), dim=-1)


class Conv2dGroups2Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv2d = nn.Conv2d(16, 32, 3, padding=1, groups=2)
        self.lin0 = nn.Linear(12800, 2)

    def forward(self, x):
        x = torch.relu(self.conv2d(x)).flatten(1)
        return torch.log_softmax(self.lin0(x), dim=-1)


class Conv3dModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv3d = nn.Conv3d(5, 10, 3)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, x):
        x = torch.stack([x] * 3, dim=-1).reshape(-1, 5, 3, 3, 3)
        x = torch.relu(self.conv3d(x)).flatten(1)
        return torch.log_softmax(self.lin0(x), dim=-1)


class MHAModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, x):
        x, _ = self.mha(x, x, x)
        return torch.log_softmax(self.lin0(x), dim=-1)


def _inputs(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


CUSTOM_MODELS = {
    "MLP": (MLP, lambda: _inputs((9, 10))),
    "EmbConv1D": (
        EmbConv1D,
        lambda: torch.randint(0, 100, (9, 10), generator=torch.Generator().manual_seed(1)),
    ),
    "Conv1d": (Conv1dModel, lambda: _inputs((9, 10))),
    "Conv2d": (Conv2dModel, lambda: _inputs((9, 10))),
    "Conv2dGroups": (Conv2dGroupsModel, lambda: _inputs((9, 10))),
    "Conv2dGroups2": (Conv2dGroups2Model, lambda: _inputs((3, 16, 20, 20))),
    "Conv3d": (Conv3dModel, lambda: _inputs((9, 10))),
    "MHA": (MHAModel, lambda: _inputs((9, 10))),
}


def make(model_id: str) -> tuple[nn.Module, torch.Tensor]:
    cls, make_input = CUSTOM_MODELS[model_id]
    torch.manual_seed(0)
    return cls().eval(), make_input()
