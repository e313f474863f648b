"""(IA)³: the kernel against float64 math, the layers against the real ``peft`` (outputs, gradients,
merged weights, both save/load directions) on tiny Llama, GPT-2 (Conv1D), BERT and conv models,
and the config's peft fields."""

import copy
import json

import pytest
import torch
from torch import nn

from lightning_peft import (
    IA3Config,
    IA3Conv,
    IA3Linear,
    inject_adapters,
    load_adapter,
    merge_adapters,
    read_config,
    save_adapter,
    unload,
    unmerge_adapters,
)
from lightning_peft.model.targeting import select_targets
from peft_kernels import ia3_linear, ia3_merge, ia3_scale
from tests.helpers.tiny_models import MODELS, assert_unchanged, snapshot, tokens

peft = pytest.importorskip("peft")

# (targets, feed-forward ones) per family: attention keys/values and the second MLP layer, as
# the paper adapts them; GPT-2's c_attn is one fused Conv1D, its MLP output c_proj a Conv1D too.
IA3_TARGETS = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
}


# -- the kernel ---------------------------------------------------------------------------------


def reference(x, weight, bias, scale, feedforward):
    """The paper's formulas in float64."""
    x, weight, scale = x.double(), weight.double(), scale.double()
    bias = None if bias is None else bias.double()
    if feedforward:
        y = (x * scale) @ weight.T
        return y if bias is None else y + bias
    y = x @ weight.T
    return (y if bias is None else y + bias) * scale


@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
def test_ia3_linear_matches_float64_math_and_its_gradients(feedforward, with_bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 13, generator=gen, requires_grad=True)  # 3-D, odd sizes
    weight = torch.randn(7, 13, generator=gen)
    bias = torch.randn(7, generator=gen) if with_bias else None
    scale = torch.randn(13 if feedforward else 7, generator=gen, requires_grad=True)
    y = ia3_linear(x, weight, bias, scale, feedforward)
    grad = torch.randn(y.shape, generator=gen)
    dx, dl = torch.autograd.grad(y, (x, scale), grad)

    x64, l64 = x.detach().double().requires_grad_(), scale.detach().double().requires_grad_()
    y64 = reference(x64, weight, bias, l64, feedforward)
    dx64, dl64 = torch.autograd.grad(y64, (x64, l64), grad.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.double(), dx64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dl.double(), dl64, rtol=1e-5, atol=1e-4)


def test_ia3_scale_rounds_once_from_the_wider_dtype():
    t = torch.randn(3, 4, 6).to(torch.bfloat16)
    scale = torch.randn(4)
    out = ia3_scale(t, scale, dim=1)
    assert out.dtype == torch.bfloat16
    expected = (t.float() * scale[None, :, None]).to(torch.bfloat16)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("feedforward", [False, True])
def test_grouped_conv_merge_equals_scaling_and_unmerge_restores(feedforward):
    """A grouped conv (4 -> 6 channels, 2 groups): output channel o sees only its group's inputs,
    so input scaling folds group by group."""
    gen = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(6, 2, 3, 3, generator=gen), torch.randn(6, generator=gen)
    scale = torch.rand(4 if feedforward else 6, generator=gen) + 0.5
    x = torch.randn(1, 4, 5, 5, generator=gen)
    conv = nn.functional.conv2d
    channels = scale[None, :, None, None]
    if feedforward:
        expected = conv(x * channels, weight, bias, groups=2)
    else:
        expected = conv(x, weight, bias, groups=2) * channels
    merged_w, merged_b = ia3_merge(weight, bias, scale, feedforward, groups=2)
    torch.testing.assert_close(conv(x, merged_w, merged_b, groups=2), expected)
    restored_w, restored_b = ia3_merge(
        merged_w, merged_b, scale, feedforward, groups=2, inverse=True
    )
    torch.testing.assert_close(restored_w, weight, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(restored_b, bias, rtol=1e-6, atol=1e-6)


def test_unmerge_with_a_zero_entry_is_refused_before_anything_changes():
    layer = IA3Linear(nn.Linear(4, 3), feedforward=False)
    with torch.no_grad():
        layer.ia3_l[1] = 0.0
    layer.merge()
    before = snapshot(layer)
    with pytest.raises(ValueError, match="entry 1 of its vector is 0"):
        layer.unmerge()
    assert_unchanged(layer, before)
    assert layer.merged


# -- against peft, transformers families ---------------------------------------------------------


def peft_ia3_grads(peft_model) -> dict[str, torch.Tensor]:
    return {
        name.removeprefix("base_model.model.").replace(".default", ""): p.grad
        for name, p in peft_model.named_parameters()
        if p.grad is not None
    }


@pytest.mark.parametrize("family", list(MODELS))
def test_outputs_and_grads_equal_peft_both_ways(family, tmp_path):
    targets, feedforward = IA3_TARGETS[family]
    base = MODELS[family]()
    ids = tokens()
    config = IA3Config(target_modules=targets, feedforward_modules=feedforward)
    ours = copy.deepcopy(base)
    inject_adapters(ours, config)
    with torch.no_grad():  # vectors away from 1, so that every one matters
        for name, param in ours.named_parameters():
            if name.endswith("ia3_l"):
                param.uniform_(0.5, 1.5)
    save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(
        copy.deepcopy(base), tmp_path / "ours", is_trainable=True
    )
    ours_out, theirs_out = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    assert (ours_out - theirs_out).abs().max().item() == 0.0
    assert not torch.allclose(ours_out, base(input_ids=ids).logits)  # the adapter acts
    ours_out.square().mean().backward()
    theirs_out.square().mean().backward()
    their_grads = peft_ia3_grads(theirs)
    our_grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert our_grads.keys() == their_grads.keys()
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, their_grads[name], rtol=1e-5, atol=1e-7)

    # peft's own adapter (random vectors) loads here with equal outputs
    peft_config = peft.IA3Config(
        target_modules=targets, feedforward_modules=feedforward, init_ia3_weights=False
    )
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft_config)
    peft_model.save_pretrained(tmp_path / "theirs")
    mine = load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    assert (mine(input_ids=ids).logits - peft_model(input_ids=ids).logits).abs().max() == 0


@pytest.mark.parametrize("family", list(MODELS))
def test_merged_weights_equal_peft_merge_and_unload(family):
    targets, feedforward = IA3_TARGETS[family]
    base = MODELS[family]()
    peft_model = peft.get_peft_model(
        copy.deepcopy(base),
        peft.IA3Config(
            target_modules=targets, feedforward_modules=feedforward, init_ia3_weights=False
        ),
    )
    ours = copy.deepcopy(base)
    inject_adapters(ours, IA3Config(target_modules=targets, feedforward_modules=feedforward))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "ia3_l" in name:
                key = name.removeprefix("base_model.model.").replace(".default", "")
                ours.get_parameter(key).copy_(param)
    ids = tokens()
    adapted = ours(input_ids=ids).logits
    merge_adapters(ours)
    theirs = peft_model.merge_and_unload()
    unloaded = unload(copy.deepcopy(ours))  # merged already: unload keeps the merged weights
    mine, their_sd = unloaded.state_dict(), theirs.state_dict()
    assert mine.keys() == their_sd.keys()
    for key, value in mine.items():
        torch.testing.assert_close(value, their_sd[key], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)
    unmerge_adapters(ours)
    for key, value in base.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-6, atol=1e-6)


def test_bfloat16_model_equals_peft():
    targets, feedforward = IA3_TARGETS["llama"]
    base = MODELS["llama"]().to(torch.bfloat16)
    ours = copy.deepcopy(base)
    inject_adapters(
        ours,
        IA3Config(target_modules=targets, feedforward_modules=feedforward, init_ia3_weights=False),
    )
    assert all(p.dtype == torch.float32 for n, p in ours.named_parameters() if "ia3_l" in n)
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.IA3Config(target_modules=targets, feedforward_modules=feedforward),
    )
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "ia3_l" in name:
                key = name.removeprefix("base_model.model.").replace(".default", "")
                param.copy_(ours.get_parameter(key))
    ids = tokens()
    assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


# -- against peft, convolutions ------------------------------------------------------------------


class ConvNet(nn.Module):
    """The conv layer types peft's IA³ adapts: Conv2d (plain and grouped) and Conv3d."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv2d = nn.Conv2d(3, 6, 3, padding=1)
        self.grouped = nn.Conv2d(6, 4, 3, groups=2, bias=False)
        self.conv3d = nn.Conv3d(4, 5, (1, 2, 2))

    def forward(self, x):
        h = torch.tanh(self.grouped(torch.tanh(self.conv2d(x))))
        return self.conv3d(h.unsqueeze(2))


@pytest.mark.parametrize("feedforward", [["grouped"], ["conv2d", "conv3d"]])
def test_conv_layers_equal_peft_both_ways(feedforward, tmp_path):
    base = ConvNet()
    x = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(2))
    targets = ["conv2d", "grouped", "conv3d"]
    peft_model = peft.get_peft_model(
        copy.deepcopy(base),
        peft.IA3Config(
            target_modules=targets, feedforward_modules=feedforward, init_ia3_weights=False
        ),
    )
    peft_model.save_pretrained(tmp_path / "theirs")
    mine = load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    assert {type(m) for m in mine.modules()} >= {IA3Conv}
    expected = peft_model(x)
    assert (mine(x) - expected).abs().max() == 0
    save_adapter(mine, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert (again(x) - expected).abs().max() == 0
    merge_adapters(mine)
    torch.testing.assert_close(mine(x), expected, rtol=1e-5, atol=1e-6)
    merged_theirs = peft_model.merge_and_unload()
    for key, value in unload(mine).state_dict().items():
        torch.testing.assert_close(value, merged_theirs.state_dict()[key], rtol=1e-6, atol=1e-7)


# -- config and file -----------------------------------------------------------------------------


def test_peft_config_fields_are_accepted_and_inert():
    theirs = peft.IA3Config(
        target_modules=["k_proj", "down_proj"],
        feedforward_modules=["down_proj"],
        fan_in_fan_out=True,
        inference_mode=True,
        task_type="CAUSAL_LM",
    ).to_dict()
    ours = IA3Config(**theirs)
    assert ours == IA3Config(
        target_modules=["k_proj", "down_proj"],
        feedforward_modules=["down_proj"],
        task_type="CAUSAL_LM",
    )
    assert "fan_in_fan_out" not in ours.to_dict()


def test_config_refusals():
    with pytest.raises(ValueError, match="feedforward_modules must be a subset"):
        IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ValueError, match="target_modules is required"):
        IA3Config()
    with pytest.raises(ValueError, match="IA3Config describes IA3"):
        IA3Config(target_modules=["q"], peft_type="LORA")
    with pytest.raises(ValueError, match="init_ia3_weights must be True or False"):
        IA3Config(target_modules=["q"], init_ia3_weights="ones")


def test_feedforward_rule_is_peft_s():
    config = IA3Config(target_modules=["down_proj", "proj"], feedforward_modules=["proj"])
    # a list entry is a plain suffix in peft (no dot needed): down_proj is feed-forward too
    assert config.is_feedforward("model.layers.0.mlp.down_proj")
    regex = IA3Config(target_modules=".*proj", feedforward_modules=".*down_proj")
    assert regex.is_feedforward("a.down_proj") and not regex.is_feedforward("a.up_proj")
    assert not IA3Config(target_modules=["q"]).is_feedforward("q")


class Nested(nn.Module):
    """``fc`` at the root and ``block.fc``: the exact name ``fc`` is a suffix of the other."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 6)
        self.block = nn.Module()
        self.block.fc = nn.Linear(6, 6)

    def forward(self, x):
        return self.block.fc(torch.tanh(self.fc(x)))


def test_saved_target_list_selects_exactly_the_adapted_modules_in_peft(tmp_path):
    base = Nested()
    ours = copy.deepcopy(base)
    inject_adapters(ours, IA3Config(target_modules="fc", init_ia3_weights=False))
    assert select_targets(base, IA3Config(target_modules="fc")) == ["fc"]
    save_adapter(ours, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["target_modules"] == "fc"  # a regex: the list ["fc"] would take block.fc too
    assert written["feedforward_modules"] == []  # never None: peft would fill it from a table
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    x = torch.randn(3, 6)
    assert (theirs(x) - ours(x)).abs().max() == 0
    assert read_config(tmp_path) == IA3Config(
        target_modules="fc", feedforward_modules=[], init_ia3_weights=False
    )


def test_unknown_fields_refused_on_load(tmp_path):
    base = MODELS["llama"]()
    ours = copy.deepcopy(base)
    inject_adapters(ours, IA3Config(target_modules=["v_proj"]))
    save_adapter(ours, tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "ia3_dropout": 0.1}))
    fresh = copy.deepcopy(base)
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=r"ia3_dropout=0\.1 is a field this package does not know"):
        load_adapter(fresh, tmp_path)
    assert_unchanged(fresh, before)


def test_layers_it_cannot_adapt_are_refused_by_name():
    model = nn.Sequential(nn.Conv1d(3, 4, 2), nn.Embedding(5, 3))
    with pytest.raises(ValueError, match=r"target .0. is a Conv1d; IA³ adapts nn\.Linear, Conv1D"):
        inject_adapters(model, IA3Config(target_modules=["0"]))
    with pytest.raises(TypeError, match="IA3Linear cannot adapt a Embedding"):
        IA3Linear(nn.Embedding(5, 3), feedforward=False)


def test_default_init_leaves_the_model_unchanged_and_report_rows():
    base = MODELS["gpt2"]()
    model = copy.deepcopy(base)
    report = inject_adapters(
        model,
        IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]),
    )
    ids = tokens()
    assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
    rows = {m.name: (m.kind, m.params) for m in report.modules}
    assert rows["transformer.h.0.attn.c_attn"] == ("IA3 (output)", 96)  # fused q, k, v: 3 x 32
    assert rows["transformer.h.0.mlp.c_proj"] == ("IA3 (input)", 128)  # GPT-2's MLP: 4 x 32
    assert report.trainable_params == 2 * (96 + 128)
