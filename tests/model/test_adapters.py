"""Adapter layers and injection: init, training, errors that leave the model untouched."""

import copy
import json

import pytest
import torch
from torch import nn

from lightning_peft import (
    AdapterConfig,
    LoRAConfig,
    LoRALinear,
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
from lightning_peft.methods.registry import adapter_layers
from tests.helpers.tiny_models import MODELS, TARGETS, assert_unchanged, logits, snapshot, tokens

CONFIGS = {
    "lora": lambda family: LoRAConfig(r=4, target_modules=TARGETS[family]),
    "dora": lambda family: LoRAConfig(r=4, target_modules=TARGETS[family], use_dora=True),
    "gaussian": lambda family: LoRAConfig(
        r=4, target_modules=TARGETS[family], init_lora_weights="gaussian"
    ),
    "pissa": lambda family: LoRAConfig(
        r=4, target_modules=TARGETS[family], init_lora_weights="pissa"
    ),
    "adapter": lambda family: AdapterConfig(bottleneck_dim=8, target_modules=TARGETS[family]),
}


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("method", list(CONFIGS))
def test_adapted_model_equals_base_at_init(family, method):
    base = MODELS[family]()
    model = copy.deepcopy(base)
    report = inject_adapters(model, CONFIGS[method](family))
    assert report.modules and 0 < report.trainable_fraction < 0.5
    ids = tokens()
    tol = 1e-5 if method == "pissa" else 0  # PiSSA: W_res + sBA = W up to fp32 rounding
    torch.testing.assert_close(logits(model, ids), logits(base, ids), rtol=tol, atol=tol)


def test_report_table_and_counts():
    model = MODELS["llama"]()
    total = sum(p.numel() for p in model.parameters())
    report = inject_adapters(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert [m.name for m in report.modules] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    adapter_params = sum(p.numel() for p in trainable_parameters(model).values())
    assert report.trainable_params == adapter_params == 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)
    assert report.total_params == total + adapter_params
    text = str(report)
    assert "model.layers.1.self_attn.v_proj" in text and "trainable params" in text


@pytest.mark.parametrize("method", ["lora", "dora", "adapter"])
def test_training_changes_only_adapters(method):
    model = MODELS["llama"]()
    model.train()
    inject_adapters(model, CONFIGS[method]("llama"))
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tokens(batch=4, length=9)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
            assert param.grad is None
        else:
            assert not torch.equal(param, adapters[name]), name


def test_disable_adapters_gives_the_base_model():
    base = MODELS["gpt2"]()
    model = copy.deepcopy(base)
    inject_adapters(model, LoRAConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    ids = tokens()
    adapted = logits(model, ids)
    with disable_adapters(model):
        torch.testing.assert_close(logits(model, ids), logits(base, ids))
    torch.testing.assert_close(logits(model, ids), adapted)


def test_disable_adapters_refuses_merged_adapters():
    """Skipping a merged adapter would still run its update (it is in W): refused, unchanged."""
    base = MODELS["gpt2"]()
    model = copy.deepcopy(base)
    inject_adapters(model, LoRAConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    ids = tokens()
    adapted = logits(model, ids)
    merge_adapters(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"merged into the weights .* unmerge_adapters\(model\)"):
        with disable_adapters(model):
            pass
    assert_unchanged(model, before)
    assert all(not layer.disabled for _, layer in adapter_layers(model))
    unmerge_adapters(model)
    with disable_adapters(model):
        torch.testing.assert_close(logits(model, ids), logits(base, ids))
    torch.testing.assert_close(logits(model, ids), adapted)


def test_dora_norm_cache_follows_weight_changes():
    layer = LoRALinear(nn.Linear(12, 9), r=3, lora_alpha=3, use_dora=True, init_lora_weights=False)
    x = torch.randn(5, 12)
    layer(x)
    with torch.no_grad():
        layer.weight.mul_(1.5)
    fresh = LoRALinear(nn.Linear(12, 9), r=3, lora_alpha=3, use_dora=True)
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x), fresh(x))


def test_dora_inference_norm_is_reused_only_while_w_a_b_are_unchanged():
    """Forwards without autograd (decoding) reuse DoRA's norm; any change to W, A or B, or a
    recorded forward in between, makes the next one recompute it: outputs always equal a fresh
    layer's with the same tensors."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(12, 9), r=3, lora_alpha=3, use_dora=True, init_lora_weights=False)
    x = torch.randn(2, 5, 12)

    def fresh_output():
        fresh = LoRALinear(nn.Linear(12, 9), r=3, lora_alpha=3, use_dora=True)
        fresh.load_state_dict(layer.state_dict())
        return fresh(x)

    with torch.no_grad():
        first = layer(x)
        cached = layer._inference_norm[1]
        assert layer(x) is not first and layer._inference_norm[1] is cached  # reused
        for tensor in (layer.lora_A, layer.lora_B, layer.weight):
            tensor.mul_(1.25)
            changed = layer(x)
            torch.testing.assert_close(changed, fresh_output(), rtol=0, atol=0)
            assert not torch.equal(changed, first)
            first = changed
    layer(x).sum().backward()  # a recorded forward drops the cached norm
    assert layer._inference_norm is None


def test_pissa_residual_and_factors():
    linear = nn.Linear(16, 12)
    original = linear.weight.detach().clone()
    layer = LoRALinear(linear, r=3, lora_alpha=6, init_lora_weights="pissa")
    u, s, vh = torch.linalg.svd(original)
    top = (u[:, :3] * s[:3]) @ vh[:3]
    torch.testing.assert_close(
        layer.scaling * layer.lora_B @ layer.lora_A, top, atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(layer.weight + layer.delta_weight(), original, atol=1e-5, rtol=1e-5)


def test_bottleneck_adapter_round_trip_and_no_merge(tmp_path):
    base = MODELS["bert"]()
    model = copy.deepcopy(base)
    inject_adapters(model, AdapterConfig(bottleneck_dim=4, target_modules=["attention.output"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bottleneck_adapter.up" in name:
                p.normal_()
    ids = tokens()
    adapted = logits(model, ids)
    assert not torch.allclose(adapted, logits(base, ids))
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == (
        "LIGHTNING_BOTTLENECK"
    )
    torch.testing.assert_close(logits(load_adapter(copy.deepcopy(base), tmp_path), ids), adapted)
    with pytest.raises(ValueError, match="cannot be merged"):
        merge_adapters(model)
    torch.testing.assert_close(logits(unload(model, merge=False), ids), logits(base, ids))
    assert model.state_dict().keys() == base.state_dict().keys()


# -- errors leave the model untouched ----------------------------------------------------------


def test_no_module_matched_names_close_matches():
    model = MODELS["llama"]()
    before = snapshot(model)
    with pytest.raises(ValueError) as error:
        inject_adapters(model, LoRAConfig(target_modules=["q_porj"]))
    message = str(error.value)
    assert message.startswith("no module matched target_modules=['q_porj']")
    assert "close matches: 'q_porj' -> 'q_proj'" in message
    assert "embed_tokens" in message  # the model's module names are listed
    assert_unchanged(model, before)


def test_lora_on_a_non_linear_target_is_refused():
    model = MODELS["llama"]()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"LoRA adapts nn\.Linear"):
        inject_adapters(model, LoRAConfig(target_modules=["self_attn"]))
    assert_unchanged(model, before)


def test_injecting_twice_is_an_error():
    model = MODELS["llama"]()
    inject_adapters(model, LoRAConfig(target_modules=["q_proj"]))
    before = snapshot(model)
    with pytest.raises(ValueError, match="already has adapters"):
        inject_adapters(model, LoRAConfig(target_modules=["v_proj"]))
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 0}, "r must be"),
        ({"bias": "some"}, "bias must be one of"),
        ({"init_lora_weights": "corda"}, "init_lora_weights must be one of"),
        ({"lora_dropout": 1.5}, "lora_dropout"),
        ({"target_modules": "(unclosed"}, "not a valid regular expression"),
        ({"rank_pattern": {"q": 0}}, "positive number"),
        ({"backend": "cuda"}, "backend must be one of"),
    ],
)
def test_invalid_config_values_list_the_choices(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig(**{"target_modules": ["q_proj"], **kwargs})


def test_pissa_rank_too_large_leaves_model_untouched():
    model = MODELS["llama"]()
    before = snapshot(model)
    with pytest.raises(ValueError, match="pissa needs r"):
        inject_adapters(
            model, LoRAConfig(r=40, target_modules=["v_proj"], init_lora_weights="pissa")
        )
    assert_unchanged(model, before)


def _saved_adapter(tmp_path, family="llama", **kwargs):
    model = MODELS[family]()
    inject_adapters(model, LoRAConfig(r=4, target_modules=TARGETS[family], **kwargs))
    return save_adapter(model, tmp_path)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("drop_key", "missing key"),
        ("extra_key", "unexpected key"),
        ("wrong_shape", "has shape"),
        ("unknown_method", "unknown adapter method"),
        ("other_model", "no module matched"),
        ("no_weights", "has no adapter_model.safetensors or adapter_model.bin"),
    ],
)
def test_load_that_does_not_fit_changes_nothing(tmp_path, damage, match):
    from safetensors.torch import load_file, save_file

    directory = _saved_adapter(tmp_path, use_dora=True)
    weights = load_file(directory / "adapter_model.safetensors")
    config = json.loads((directory / "adapter_config.json").read_text())
    key = sorted(weights)[0]
    if damage == "drop_key":
        del weights[key]
    elif damage == "extra_key":
        weights["base_model.model.model.norm.lora_A.weight"] = torch.zeros(1)
    elif damage == "wrong_shape":
        weights[key] = torch.zeros(3, 3)
    elif damage == "unknown_method":
        config["peft_type"] = "LOHA"  # a peft method this package does not have
    elif damage == "no_weights":
        (directory / "adapter_model.safetensors").unlink()
    if damage != "no_weights":
        save_file(weights, directory / "adapter_model.safetensors")
    (directory / "adapter_config.json").write_text(json.dumps(config))
    model = MODELS["gpt2" if damage == "other_model" else "llama"](seed=5)
    before = snapshot(model)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_adapter(model, directory)
    assert_unchanged(model, before)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_adapter_state_dict_holds_only_adapters():
    model = MODELS["llama"]()
    inject_adapters(model, LoRAConfig(r=4, target_modules=["q_proj"], use_dora=True))
    keys = set(adapter_state_dict(model))
    assert keys == {
        f"model.layers.{i}.self_attn.q_proj.{p}"
        for i in (0, 1)
        for p in ("lora_A", "lora_B", "lora_magnitude")
    }
