"""Every registered method, on every layer type it adapts: its tensors reach the state dict, the
trainable set, the report and the saved file, with the keys and shapes the layer class declares
before injection; the file loads back; merge, disable and unload give what they promise."""

import copy
import dataclasses
import re

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lightning_peft.methods.registry
from lightning_peft import (
    AdapterConfig,
    IA3Config,
    IA3Conv,
    IA3Linear,
    LoRAConfig,
    PromptEmbedding,
    PromptTuningConfig,
    adapter_state_dict,
    disable_adapters,
    inject_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
    trainable_parameters,
    unload,
    unmerge_adapters,
)
from lightning_peft.core.adapter import Method
from lightning_peft.methods.bottleneck.layers import BottleneckAdapter
from lightning_peft.methods.lora.conv import LoRAConv
from lightning_peft.methods.lora.embedding import LoRAEmbedding
from lightning_peft.methods.lora.linear import LoRALinear
from lightning_peft.methods.lora.method import LORA
from lightning_peft.methods.lora.mha import LoRAMultiheadAttention
from lightning_peft.methods.lora.quantized import QuantizedLoRALinear
from lightning_peft.methods.registry import METHODS, adapter_layers
from lightning_peft.model.injection import planned_tensors
from lightning_peft.peft_format.files import peft_key
from tests.helpers.quantized_models import QuantizedSmallModel
from tests.helpers.tiny_models import tiny_llama


class SmallModel(nn.Module):
    """A Linear with a bias, one without, and transformers' Conv1D (weight stored (in, out));
    the sizes are no multiples of anything."""

    def __init__(self, seed: int = 0):
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(11, 9)
        self.proj_nobias = nn.Linear(9, 7, bias=False)
        self.conv = Conv1D(5, 7)  # nf=5 outputs, nx=7 inputs
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(torch.tanh(self.proj_nobias(self.proj(x))))))

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randn(4, 11, generator=torch.Generator().manual_seed(3))


class ConvModel(nn.Module):
    """Conv1d, Conv2d (grouped, and strided without a bias) and Conv3d, odd sizes."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.grouped = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.strided = nn.Conv2d(6, 5, (3, 2), stride=2, bias=False)
        self.conv1 = nn.Conv1d(5, 3, 2)
        self.conv3 = nn.Conv3d(3, 2, 2)
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        x = torch.tanh(self.strided(torch.tanh(self.grouped(x))))  # (N, 5, 3, 3)
        x = torch.tanh(self.conv1(x.flatten(2)))  # (N, 3, 8)
        x = self.conv3(x.reshape(-1, 3, 2, 2, 2))  # (N, 2, 1, 1, 1)
        return self.head(x.flatten(1))

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randn(2, 4, 7, 7, generator=torch.Generator().manual_seed(3))


class EmbeddingModel(nn.Module):
    """Two embeddings (one with a padding index) and a head."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.tokens = nn.Embedding(23, 6, padding_idx=0)
        self.positions = nn.Embedding(9, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        positions = torch.arange(ids.shape[-1])
        return self.head(torch.tanh(self.tokens(ids) + self.positions(positions)))

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randint(0, 23, (3, 9), generator=torch.Generator().manual_seed(3))


class AttentionModel(nn.Module):
    """Two attention modules (batch-first with bias_k/bias_v; one without biases)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.attn = nn.MultiheadAttention(10, 2, batch_first=True, add_bias_kv=True)
        self.cross = nn.MultiheadAttention(10, 5, batch_first=True, bias=False)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        h, _ = self.attn(x, x, x)
        h, _ = self.cross(torch.tanh(h), x, x, need_weights=False)
        return self.head(h)

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randn(2, 7, 10, generator=torch.Generator().manual_seed(3))


class SmallConvModel(nn.Module):
    """A Conv2d, a grouped Conv2d (2 groups) and a Conv3d; sizes no multiples of anything."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv2d = nn.Conv2d(3, 6, 3, padding=1)
        self.grouped = nn.Conv2d(6, 4, 3, groups=2, bias=False)
        self.conv3d = nn.Conv3d(4, 5, (1, 2, 2))

    def forward(self, x):  # x (N, 3, 5, 7)
        h = torch.tanh(self.grouped(torch.tanh(self.conv2d(x))))
        return self.conv3d(h.unsqueeze(2))

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(3))


def token_input() -> torch.Tensor:
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))


def tiny_causal_lm(seed: int = 0):
    """tiny_llama without a key/value cache, so that its output holds only tensors."""
    model = tiny_llama(seed)
    model.config.use_cache = False
    model.example_input = token_input
    return model


TARGETS = ["proj", "proj_nobias", "conv"]
CONV_TARGETS = ["conv2d", "grouped", "conv3d"]
CONVS = ["grouped", "strided", "conv1", "conv3"]
EMBEDDINGS = ["tokens", "positions"]
# Each registered layer class -> (a small model with the layer types it adapts and an
# ``example_input()``, configs).
LAYER_CASES = {
    LoRALinear: (
        SmallModel,
        {
            "lora": LoRAConfig(r=2, target_modules=TARGETS, init_lora_weights=False),
            "dora-bias-all": LoRAConfig(
                r=3, target_modules=TARGETS, use_dora=True, bias="all", init_lora_weights=False
            ),
            "rslora-lora_only-save-head": LoRAConfig(
                r=1,
                target_modules=TARGETS,
                use_rslora=True,
                bias="lora_only",
                modules_to_save=["head"],
                init_lora_weights=False,
            ),
            "lora_bias": LoRAConfig(
                r=2, target_modules=TARGETS, lora_bias=True, init_lora_weights=False
            ),
        },
    ),
    LoRAConv: (
        ConvModel,
        {
            "lora": LoRAConfig(r=2, target_modules=CONVS, init_lora_weights=False),
            "dora-bias-all": LoRAConfig(
                r=4, target_modules=CONVS, use_dora=True, bias="all", init_lora_weights=False
            ),
            "rslora-r1-lora_only-save-head": LoRAConfig(
                r=1,
                rank_pattern={"grouped": 2},
                target_modules=CONVS,
                use_rslora=True,
                bias="lora_only",
                modules_to_save=["head"],
                init_lora_weights=False,
            ),
            "lora_bias-ungrouped": LoRAConfig(
                r=3,
                target_modules=["strided", "conv1", "conv3"],
                lora_bias=True,
                init_lora_weights=False,
            ),
        },
    ),
    LoRAEmbedding: (
        EmbeddingModel,
        {
            "lora": LoRAConfig(r=2, target_modules=EMBEDDINGS, init_lora_weights=False),
            "dora-save-head": LoRAConfig(
                r=3,
                target_modules=EMBEDDINGS,
                use_dora=True,
                modules_to_save=["head"],
                init_lora_weights=False,
            ),
            "rslora-r1": LoRAConfig(
                r=1, target_modules=["tokens"], use_rslora=True, init_lora_weights=False
            ),
        },
    ),
    LoRAMultiheadAttention: (
        AttentionModel,
        {
            "lora": LoRAConfig(r=2, target_modules=["attn", "cross"], init_lora_weights=False),
            "rslora-r1-save-head": LoRAConfig(
                r=1,
                target_modules=["attn", "cross"],
                use_rslora=True,
                modules_to_save=["head"],
                init_lora_weights=False,
            ),
        },
    ),
    # bitsandbytes Linear4bit (nf4, double quantization) layers; skipped without bitsandbytes.
    QuantizedLoRALinear: (
        QuantizedSmallModel,
        {
            "qlora": LoRAConfig(
                r=2, target_modules=["proj", "proj_nobias"], init_lora_weights=False
            ),
            "qdora": LoRAConfig(
                r=3, target_modules=["proj", "proj_nobias"], use_dora=True, init_lora_weights=False
            ),
            "rslora-lora_only-save-head": LoRAConfig(
                r=1,
                target_modules=["proj", "proj_nobias"],
                use_rslora=True,
                bias="lora_only",
                modules_to_save=["head"],
                init_lora_weights=False,
            ),
        },
    ),
    BottleneckAdapter: (
        SmallModel,
        {
            "adapter": AdapterConfig(bottleneck_dim=3, target_modules=TARGETS),
            "adapter-lora_only": AdapterConfig(
                bottleneck_dim=2, target_modules=["proj"], bias="lora_only"
            ),
        },
    ),
    IA3Linear: (
        SmallModel,
        {
            "ia3": IA3Config(target_modules=TARGETS, feedforward_modules=["proj_nobias"]),
            "ia3-feedforward-conv1d-save-head": IA3Config(
                target_modules=TARGETS,
                feedforward_modules=["proj", "conv"],
                modules_to_save=["head"],
            ),
        },
    ),
    IA3Conv: (
        SmallConvModel,
        {
            "ia3-conv": IA3Config(target_modules=CONV_TARGETS, feedforward_modules=["grouped"]),
            "ia3-conv-feedforward": IA3Config(
                target_modules=CONV_TARGETS, feedforward_modules=["conv2d", "conv3d"]
            ),
        },
    ),
    PromptEmbedding: (
        tiny_causal_lm,
        {
            "prompt-tuning": PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
            "prompt-tuning-save-head": PromptTuningConfig(
                num_virtual_tokens=1, task_type="CAUSAL_LM", modules_to_save=["lm_head"]
            ),
        },
    ),
}
CASES = [(cls, name) for cls, (_, configs) in LAYER_CASES.items() for name in configs]


def test_every_registered_layer_class_has_a_case():
    registered = {cls for method in METHODS for cls in method.layers}
    assert registered == set(LAYER_CASES), "add the new layer class to LAYER_CASES"


def randomise_adapters(model: nn.Module) -> None:
    """Adapters that act (bottleneck ``up`` starts at zero), so that a lost tensor shows."""
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for name in layer.adapter_parameter_names():
                layer.get_parameter(name).normal_(0, 0.3)


def check_method_on(make_model, config, layer_class, tmp_path) -> None:
    """The contract of a registered method on one model (asserts)."""
    base = make_model()
    x = base.example_input()
    planned = planned_tensors(base, config)
    model = copy.deepcopy(base)
    report = inject_adapters(model, config)
    randomise_adapters(model)
    layers = dict(adapter_layers(model))
    assert layers and all(type(layer) is layer_class for layer in layers.values())

    # Every tensor the adapters add is an adapter tensor, in each of the four places.
    added = set(model.state_dict()) - set(base.state_dict())
    state = adapter_state_dict(model)
    trainable = trainable_parameters(model)
    declared = {
        f"{path}.{n}" for path, layer in layers.items() for n in layer.adapter_parameter_names()
    }
    assert added <= declared, f"undeclared adapter tensors: {sorted(added - declared)}"
    assert declared <= set(state), f"missing from adapter_state_dict: {declared - set(state)}"
    assert declared <= set(trainable), f"not trainable: {declared - set(trainable)}"
    assert set(trainable) <= set(state), "a trainable tensor is not saved"
    reported = {m.name: m.params for m in report.modules}
    for path, layer in layers.items():
        target = type(layer).placement.target_path(path)
        numel = sum(layer.get_parameter(n).numel() for n in layer.adapter_parameter_names())
        assert reported.get(target) == numel, f"report row of {target!r}"
    assert report.trainable_params == sum(p.numel() for p in trainable.values())

    # The saved file holds exactly the planned keys and shapes, and loads back.
    save_adapter(model, tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in saved.items()} == planned
    assert {peft_key(model, k) for k in state} == set(saved)
    y = model(x)
    reloaded = load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(reloaded(x), y, rtol=0, atol=0)

    with disable_adapters(model):
        torch.testing.assert_close(model(x), base(x))
    refusals = [layer.merge_refusal() for layer in layers.values()]
    if not any(refusals):
        merge_adapters(model)
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)
        unmerge_adapters(model)
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)
    else:  # refused before any layer merges
        before = copy.deepcopy(model.state_dict())
        reason = next(r for r in refusals if r)
        assert "cannot be merged" in reason
        with pytest.raises(ValueError, match=re.escape(reason)):
            merge_adapters(model)
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key
    unload(model, merge=False)
    assert model.state_dict().keys() == base.state_dict().keys()
    assert [type(m) for m in model.modules()] == [type(m) for m in base.modules()]
    torch.testing.assert_close(model(x), base(x))


@pytest.mark.parametrize(
    ("layer_class", "case"), CASES, ids=[f"{c.__name__}-{n}" for c, n in CASES]
)
def test_registered_method_contract(layer_class, case, tmp_path):
    make_model, configs = LAYER_CASES[layer_class]
    check_method_on(make_model, configs[case], layer_class, tmp_path)


class ForgetfulLoRALinear(LoRALinear):
    """A layer that does not declare one of its tensors: the contract check must catch it."""

    def adapter_parameter_names(self):
        return ["lora_A"]


def test_contract_check_catches_an_undeclared_tensor(monkeypatch, tmp_path):
    forgetful = Method(
        name=LORA.name,
        peft_type=LORA.peft_type,
        config_cls=LoRAConfig,
        layers=(ForgetfulLoRALinear,),
        write_config=LORA.write_config,
        read_config=LORA.read_config,
        scope_text=LORA.scope,
    )
    monkeypatch.setattr(lightning_peft.methods.registry, "METHODS", (forgetful,))
    config = LAYER_CASES[LoRALinear][1]["lora"]
    with pytest.raises(AssertionError, match="undeclared adapter tensors"):
        check_method_on(SmallModel, config, ForgetfulLoRALinear, tmp_path)


def test_method_lookup():
    assert lightning_peft.methods.method_for(LoRAConfig(target_modules=["q"])) is LORA
    assert lightning_peft.methods.method_for_peft_type("LORA") is LORA
    assert lightning_peft.methods.method_for_peft_type("IA3").config_cls is IA3Config
    assert not lightning_peft.methods.method_for_peft_type("LOHA")
    with pytest.raises(TypeError, match="config must be a LoRAConfig or AdapterConfig"):
        lightning_peft.methods.method_for({"r": 8})
    assert (
        LORA.mergeable
        and not lightning_peft.methods.method_for(AdapterConfig(target_modules=["q"])).mergeable
    )


def test_scope_is_derived_from_the_layer_classes():
    """A layer type added to a method's dispatch list shows in its refusals without editing
    a message: float layers first, the ones over a quantized base last."""
    assert LORA.scope == (
        "LoRA adapts nn.Linear, Conv1D, nn.Embedding, nn.Conv1d/2d/3d, nn.MultiheadAttention "
        "and bitsandbytes' Linear4bit/Linear8bitLt"
    )
    narrower = dataclasses.replace(LORA, layers=(LoRALinear, LoRAEmbedding))
    assert narrower.scope == "LoRA adapts nn.Linear, Conv1D and nn.Embedding"
    assert "is a LayerNorm; LoRA adapts nn.Linear, Conv1D and nn.Embedding" in narrower.refusal(
        nn.LayerNorm(4), "norm"
    )
