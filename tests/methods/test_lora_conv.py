"""LoRA and DoRA on nn.Conv1d/2d/3d: ``peft_kernels.lora_conv`` / ``dora_conv`` against float64
references (the merged convolution; the dense convolution a grouped adapter amounts to; DoRA with
peft's norm written out), and ``LoRAConv`` against the real peft, both save/load directions."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft import LoRAConfig, inject_adapters, lora_plus_param_groups, select_targets
from lightning_peft.methods.lora.conv import LoRAConv
from peft_kernels import (
    conv_delta_weight,
    conv_dora_weight_norm,
    dora_conv,
    dora_weight_norm,
    lora_conv,
)
from tests.helpers.peft_interop import check_against_peft

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
f64 = {"dtype": torch.float64}


def factors(out, in_channels, kernel, rank, groups=1, seed=0, dtype=torch.float64):
    """W (out, in/G, *k), b (out,), A (r, in, *k), B (out, r/G, 1…), random."""
    gen = torch.Generator().manual_seed(seed)
    ones = (1,) * len(kernel)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    return (
        rand(out, in_channels // groups, *kernel),
        rand(out),
        rand(rank, in_channels, *kernel) * 0.3,
        rand(out, rank // groups, *ones) * 0.3,
    )


def peft_layout_delta(lora_A, lora_B, weight_shape):
    """ΔW as peft's ``_DoraConvNdLayer.get_lora_weight`` builds it (reshaped to W's shape)."""
    rank = lora_A.shape[0]
    return (lora_B.reshape(-1, rank) @ lora_A.reshape(rank, -1)).reshape(weight_shape)


GEOMETRIES = [  # (spatial dims, kernel, stride, padding, dilation, input size)
    (1, (3,), 2, 1, 1, (9,)),
    (2, (3, 2), 1, 0, 1, (6, 5)),
    (2, (3, 3), 1, "same", 2, (7, 7)),
    (2, (1, 1), 1, 0, 1, (4, 3)),
    (3, (2, 3, 1), (1, 2, 1), (0, 1, 0), 1, (3, 5, 2)),
]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"conv{g[0]}d-k{g[1]}")
@pytest.mark.parametrize("rank", [1, 4])
@pytest.mark.parametrize("with_bias", [True, False])
def test_lora_conv_equals_the_merged_convolution(geometry, rank, with_bias):
    """groups = 1: conv(x, W) + s·B(A(x)) = conv(x, W + s·ΔW) (float64)."""
    spatial, kernel, stride, padding, dilation, size = geometry
    weight, bias, lora_A, lora_B = factors(5, 3, kernel, rank)
    bias = bias if with_bias else None
    x = torch.randn(2, 3, *size, **f64)
    got = lora_conv(
        x, weight, bias, lora_A, lora_B, 0.7, stride=stride, padding=padding, dilation=dilation
    )
    merged = weight + conv_delta_weight(lora_A, lora_B, 0.7)
    ref = CONV[spatial](x, merged, bias, stride, padding, dilation)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(conv_delta_weight(lora_A, lora_B, 0.7), peft_layout_delta(
        lora_A, lora_B, weight.shape) * 0.7)  # fmt: skip


@pytest.mark.parametrize(("groups", "rank", "in_channels", "out"), [(2, 2, 4, 6), (4, 4, 4, 4)])
def test_grouped_lora_conv_is_a_dense_convolution(groups, rank, in_channels, out):
    """groups = G > 1: W is block-diagonal over groups, the adapter is dense across them."""
    weight, bias, lora_A, lora_B = factors(out, in_channels, (3, 3), rank, groups)
    x = torch.randn(2, in_channels, 5, 6, **f64)
    got = lora_conv(x, weight, bias, lora_A, lora_B, 1.3, padding=1, groups=groups)
    cin, cout, rg = in_channels // groups, out // groups, rank // groups
    dense = torch.zeros(out, in_channels, 3, 3, **f64)
    for o in range(out):
        g = o // cout
        dense[o, g * cin : (g + 1) * cin] = weight[o]
        a_g = lora_A[g * rg : (g + 1) * rg]  # (r/G, in, 3, 3): all input channels
        dense[o] += 1.3 * torch.einsum("j,jchw->chw", lora_B[o, :, 0, 0], a_g)
    torch.testing.assert_close(got, F.conv2d(x, dense, bias, padding=1), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="dense across groups"):
        conv_delta_weight(lora_A, lora_B, 1.3)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_conv_dora_weight_norm_is_peft_s(groups):
    weight, _, lora_A, lora_B = factors(8, 4, (3, 2), 4, groups, seed=groups)
    ref = (weight + 0.6 * peft_layout_delta(lora_A, lora_B, weight.shape)).flatten(1).norm(dim=1)
    got = conv_dora_weight_norm(weight, lora_A, lora_B, 0.6, groups=groups)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    cached = weight.flatten(1).square().sum(1)
    got_cached = conv_dora_weight_norm(
        weight, lora_A, lora_B, 0.6, groups=groups, weight_sq_norm=cached
    )
    torch.testing.assert_close(got_cached, ref, rtol=1e-12, atol=1e-12)
    if groups == 1:  # the linear layers' factored norm on the flattened matrices
        flat = dora_weight_norm(weight.flatten(1), lora_A.flatten(1), lora_B.flatten(1), 0.6)
        torch.testing.assert_close(got, flat, rtol=0, atol=0)
    lora_A.requires_grad_(True)
    assert not conv_dora_weight_norm(weight, lora_A, lora_B, 0.6, groups=groups).requires_grad


def dora_reference(x, weight, bias, lora_A, lora_B, magnitude, s, groups, padding, keep=None):
    """peft's ``_DoraConvNdLayer`` forward written out in float64 (norm detached); ``keep``: a
    dropout mask already scaled by 1/(1−p)."""
    delta = peft_layout_delta(lora_A, lora_B, weight.shape)
    norm = (weight + s * delta).flatten(1).norm(dim=1).detach()
    scale = (magnitude / norm).view(1, -1, 1, 1)
    result = F.conv2d(x, weight, bias, 1, padding, 1, groups)
    x_in = x if keep is None else x * keep

    def lora(inp):
        return F.conv2d(F.conv2d(inp, lora_A, None, 1, padding), lora_B, None, 1, 0, 1, groups)

    if keep is None:  # peft: the base result without its bias
        base = result - bias.view(1, -1, 1, 1)
    else:  # peft: the base convolution of the dropped input
        base = F.conv2d(x_in, weight, None, 1, padding, 1, groups)
    return result + (scale - 1) * base + scale * lora(x_in) * s


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_dora_conv_outputs_and_grads_match_the_float64_reference(groups, dropout):
    weight, bias, lora_A, lora_B = factors(6, 4, (3, 3), 2, groups, seed=5)
    magnitude = torch.rand(6, **f64) + 0.5
    x = torch.randn(3, 4, 6, 5, **f64)
    leaves = [t.clone().requires_grad_(True) for t in (x, bias, lora_A, lora_B, magnitude)]
    refs = [t.clone().requires_grad_(True) for t in (x, bias, lora_A, lora_B, magnitude)]
    torch.manual_seed(7)
    got = dora_conv(
        leaves[0], weight, leaves[1], leaves[2], leaves[3], leaves[4], 0.8, dropout,
        training=True, padding=1, groups=groups,
    )  # fmt: skip
    keep = None
    if dropout:
        torch.manual_seed(7)  # the same draw as the kernel's F.dropout
        keep = F.dropout(torch.ones_like(x), dropout, True)
    ref = dora_reference(refs[0], weight, refs[1], refs[2], refs[3], refs[4], 0.8, groups, 1, keep)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(got)
    got.backward(grad_out)
    ref.backward(grad_out)
    for mine, theirs in zip(leaves, refs, strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-10, atol=1e-10)


def test_lora_conv_gradcheck():
    weight, bias, lora_A, lora_B = factors(4, 4, (2, 3), 2, groups=2, seed=3)
    inputs = [
        t.requires_grad_(True) for t in (torch.randn(1, 4, 4, 5, **f64), bias, lora_A, lora_B)
    ]

    def fn(x, b, a, bb):
        return lora_conv(x, weight, b, a, bb, 0.5, stride=(1, 2), padding=1, groups=2)

    assert torch.autograd.gradcheck(fn, inputs)


def test_bad_inputs_are_named():
    weight, bias, lora_A, lora_B = factors(6, 4, (3, 3), 2, dtype=torch.float32)
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(ValueError, match=r"lora_A must be \(r, in, \*kernel\)"):
        lora_conv(x, weight, bias, lora_A[:, :3], lora_B, 1.0)
    with pytest.raises(ValueError, match="multiples of groups"):
        lora_conv(x, weight[:, :2], bias, lora_A[:1], lora_B[:, :1], 1.0, groups=2)
    with pytest.raises(TypeError, match=r"lora_B has dtype torch\.float64"):
        lora_conv(x, weight, bias, lora_A, lora_B.double(), 1.0)
    with pytest.raises(ValueError, match="x must be"):
        lora_conv(torch.randn(1, 3, 5, 5), weight, bias, lora_A, lora_B, 1.0)
    with pytest.raises(ValueError, match=r"3-, 4- or 5-D"):
        lora_conv(x, weight.flatten(1), bias, lora_A, lora_B, 1.0)
    with pytest.raises(TypeError, match="narrower than x's"):
        lora_conv(x.double(), weight.double(), bias.double(), lora_A, lora_B, 1.0)
    with pytest.raises(TypeError, match=r"lora_bias has dtype torch\.float64"):
        lora_conv(x, weight, bias, lora_A, lora_B, 1.0, lora_bias=bias.double())
    with pytest.raises(ValueError, match="requires grad"):
        lora_conv(x, weight.requires_grad_(True), bias, lora_A, lora_B, 1.0)


def test_float32_adapters_on_a_bfloat16_base_add_in_float32_and_round_once():
    """peft's ``_ConvNd``: the base convolution in bf16, the branch (x cast up, B's bias
    included) in fp32, their sum rounded to bf16 once."""
    weight, bias, lora_A, lora_B = factors(6, 4, (3, 3), 2, dtype=torch.float32)
    lora_bias = torch.randn(6)
    x = torch.randn(2, 4, 5, 5).bfloat16()
    weight, bias = weight.bfloat16(), bias.bfloat16()
    got = lora_conv(x, weight, bias, lora_A, lora_B, 0.7, padding=1, lora_bias=lora_bias)
    branch = F.conv2d(F.conv2d(x.float(), lora_A, None, 1, 1), lora_B, lora_bias)
    want = (F.conv2d(x, weight, bias, 1, 1) + branch * 0.7).bfloat16()
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# -- the layer, against peft --------------------------------------------------------------------


class OneConv(nn.Module):
    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return torch.tanh(self.conv(x))


LAYERS = {  # name -> (conv factory, input shape)
    "conv1d-stride2-pad1": (lambda: nn.Conv1d(3, 5, 3, stride=2, padding=1), (2, 3, 11)),
    "conv2d-same-nobias": (
        lambda: nn.Conv2d(4, 6, (3, 2), padding="same", bias=False),
        (2, 4, 5, 7),
    ),
    "conv2d-groups3": (lambda: nn.Conv2d(6, 9, 3, groups=3), (2, 6, 5, 5)),
    "conv2d-depthwise": (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4), (2, 4, 6, 6)),
    "conv2d-1x1": (lambda: nn.Conv2d(5, 7, 1), (3, 5, 2, 3)),
    "conv3d-strided": (lambda: nn.Conv3d(2, 4, (2, 3, 1), stride=(1, 2, 1)), (2, 2, 3, 7, 2)),
}
VARIANTS = {
    "lora": {},
    "dora": {"use_dora": True},
    "rslora-alpha": {"use_rslora": True, "lora_alpha": 5},
    "lora-dropout-train": {"lora_dropout": 0.3},
    "dora-dropout-train": {"use_dora": True, "lora_dropout": 0.3},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("layer", list(LAYERS))
def test_conv_layer_matches_peft_both_ways(layer, variant, tmp_path):
    make_conv, shape = LAYERS[layer]

    def make_base():
        torch.manual_seed(0)
        return OneConv(make_conv())

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    rank = 12 if "depthwise" in layer else 3 if "groups3" in layer else 2
    kwargs = {"r": rank, "target_modules": ["conv"], **VARIANTS[variant]}
    result = check_against_peft(make_base, x, kwargs, tmp_path, train="train" in variant)
    print(f"\n{layer} {variant}: {result}")


def test_default_init_starts_at_the_base_model():
    torch.manual_seed(0)
    base = OneConv(nn.Conv2d(3, 4, 3))
    x = torch.randn(2, 3, 5, 5)
    for use_dora in (False, True):
        model = copy.deepcopy(base)
        inject_adapters(model, LoRAConfig(r=2, target_modules=["conv"], use_dora=use_dora))
        torch.testing.assert_close(model(x), base(x), rtol=1e-6, atol=1e-6)
    assert model.conv.lora_magnitude.shape == (1, 4, 1, 1)  # peft's shape
    torch.testing.assert_close(
        model.conv.lora_magnitude.flatten(), base.conv.weight.flatten(1).norm(dim=1)
    )


class ReflectConv(nn.Conv2d):
    def forward(self, x):  # its own forward
        return super().forward(x.flip(-1))


@pytest.mark.parametrize(
    ("conv", "config", "message"),
    [
        (nn.Conv2d(4, 4, 3, dilation=2), {}, "dilation=\\(2, 2\\); peft's LoRA convolution"),
        (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), {}, "padding_mode='reflect'"),
        (nn.Conv2d(4, 6, 3, groups=2), {"r": 3}, "rank \\(3\\) must be a multiple of groups"),
        (nn.Conv2d(4, 6, 3), {"init_lora_weights": "pissa"}, "'pissa' is not available for conv"),
        (nn.Conv1d(4, 6, 3), {"init_lora_weights": "olora"}, "'olora' is not available for conv"),
        (ReflectConv(4, 4, 3), {}, "ReflectConv\\) has its own forward"),
        (nn.Conv2d(4, 3, 2), {"use_dora": True, "zero_channel": 1}, "output channel 1 of"),
    ],
    ids=["dilation", "padding_mode", "groups-rank", "pissa", "olora", "own-forward", "dora-zero"],
)
def test_refused_by_name_and_untouched(conv, config, message):
    config = dict(config)
    if config.pop("zero_channel", None) is not None:
        with torch.no_grad():
            conv.weight[1] = 0
    model = OneConv(conv)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        inject_adapters(model, LoRAConfig(**{"r": 2, "target_modules": ["conv"], **config}))
    assert type(model.conv) is type(conv)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_low_precision_base_with_float32_adapters():
    torch.manual_seed(0)
    base = OneConv(nn.Conv2d(4, 6, 3, padding=1))
    x = torch.randn(2, 4, 6, 6)
    for use_dora in (False, True):
        config = LoRAConfig(
            r=2, target_modules=["conv"], use_dora=use_dora, init_lora_weights=False
        )
        full = copy.deepcopy(base)
        inject_adapters(full, config)
        half = copy.deepcopy(full).to(torch.bfloat16)
        assert half.conv.weight.dtype == torch.bfloat16
        assert half.conv.lora_A.dtype == torch.float32  # adapters keep their dtype
        y = half(x.bfloat16())
        assert y.dtype == torch.bfloat16
        plain = torch.tanh(F.conv2d(x.bfloat16(), half.conv.weight, half.conv.bias, padding=1))
        bf16_error = (plain.float() - base(x)).abs().max()  # plain bf16 against fp32
        assert (y.float() - full(x)).abs().max() <= 4 * bf16_error + 1e-3
        y.float().sum().backward()
        assert half.conv.lora_B.grad.dtype == torch.float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert full(x).dtype == torch.bfloat16  # a conv under autocast runs in bf16


def test_dora_follows_a_weight_loaded_after_injection():
    torch.manual_seed(0)
    model = OneConv(nn.Conv2d(3, 5, 3))
    inject_adapters(model, LoRAConfig(r=2, target_modules=["conv"], use_dora=True))
    x = torch.randn(2, 3, 5, 5)
    new_weight = torch.randn_like(model.conv.weight)
    model.load_state_dict({**model.state_dict(), "conv.weight": new_weight})
    layer = model.conv
    ref = dora_conv(
        x, new_weight, layer.bias.detach(), layer.lora_A.detach(), layer.lora_B.detach(),
        layer.lora_magnitude.detach().flatten(), layer.scaling,
    )  # fmt: skip
    torch.testing.assert_close(model(x), torch.tanh(ref))


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.conv = nn.Conv1d(4, 4, 1)
        self.proj = nn.Linear(4, 4)

    def forward(self, ids):
        return self.proj(self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2))


def test_all_linear_means_what_it_means_in_peft_and_names_reach_the_rest():
    peft = pytest.importorskip("peft")
    model = Mixed()
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules="all-linear"))
    adapted = [n for n, m in theirs.base_model.model.named_modules() if hasattr(m, "lora_A")]
    assert select_targets(model, LoRAConfig(target_modules="all-linear")) == adapted == ["proj"]
    named = LoRAConfig(target_modules=["emb", "conv", "proj"])
    assert select_targets(model, named) == ["emb", "conv", "proj"]
    report = inject_adapters(model, named)
    rows = {m.name: (m.kind, m.shape, m.params) for m in report.modules}
    assert rows["conv"] == ("LoRA", "4->4 1 conv", 8 * 4 + 4 * 8)
    assert rows["emb"] == ("LoRA", "10x4 embedding", 8 * 10 + 4 * 8)
    assert isinstance(model.conv, LoRAConv)
    assert "conv" in str(report) and "embedding" in str(report)
    slow, fast = lora_plus_param_groups(model, lr=1.0, ratio=4)  # LoRA+: the B factors faster
    assert {id(p) for p in fast["params"]} == {
        id(model.conv.lora_B),
        id(model.emb.lora_embedding_B),
        id(model.proj.lora_B),
    }
    assert len(slow["params"]) == 3


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["conv", "embedding"])
def test_dora_layers_compile_without_graph_breaks(kind):
    from tests.methods.test_adapters_registry import ConvModel, EmbeddingModel

    model_class, targets = {
        "conv": (ConvModel, ["grouped", "strided", "conv1", "conv3"]),
        "embedding": (EmbeddingModel, ["tokens", "positions"]),
    }[kind]
    model = model_class()
    config = LoRAConfig(r=2, target_modules=targets, use_dora=True, init_lora_weights=False)
    inject_adapters(model, config)
    x = model.example_input()
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
