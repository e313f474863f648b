"""lightning_peft against the real ``peft`` on tiny Llama, GPT-2 (Conv1D) and BERT models."""

import copy

import pytest
import torch

from lightning_peft import (
    LoRAConfig,
    adapter_state_dict,
    inject_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
    unload,
    unmerge_adapters,
)
from lightning_peft.model.targeting import select_targets
from tests.helpers.peft_interop import peft_adapted_names
from tests.helpers.tiny_models import MODELS, TARGETS, logits, tokens

peft = pytest.importorskip("peft")
VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}


def peft_lora_grads(peft_model) -> dict[str, torch.Tensor]:
    grads = {}
    for name, p in peft_model.named_parameters():
        if p.grad is None:
            continue
        name = name.removeprefix("base_model.model.").replace(".default", "")
        name = name.replace("lora_A.weight", "lora_A").replace("lora_B.weight", "lora_B")
        grads[name.replace("lora_magnitude_vector.weight", "lora_magnitude")] = p.grad
    return grads


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_outputs_and_grads_equal_peft_after_save_and_load(family, variant, tmp_path):
    """Ours with random A and B -> save -> peft loads it: same logits and same adapter grads."""
    base = MODELS[family]()
    ours = copy.deepcopy(base)
    config = LoRAConfig(
        r=4,
        lora_alpha=8,
        target_modules=TARGETS[family],
        init_lora_weights=False,
        **VARIANTS[variant],
    )
    inject_adapters(ours, config)
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    ids = tokens()
    y_ours, y_theirs = logits(ours, ids), logits(theirs, ids)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
    y_ours.square().mean().backward()
    y_theirs.square().mean().backward()
    their_grads = peft_lora_grads(theirs)
    our_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert our_grads.keys() == their_grads.keys()
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, their_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_saved_adapter_loads_here(family, variant, tmp_path):
    base = MODELS[family]()
    config = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=TARGETS[family],
        init_lora_weights=False,
        **VARIANTS[variant],
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path)
    ids = tokens()
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize(
    "targets",
    ["all-linear", r".*\.(q_proj|query|c_attn)", r".*layers\.1\..*_proj", r".*attention.*"],
)
def test_targeting_picks_the_modules_peft_picks(family, targets):
    base = MODELS[family]()
    try:
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=targets))
    except ValueError as theirs_error:
        # peft refuses a matched module it cannot adapt, or a pattern that matches nothing; so
        # does this package, for the same reason
        if "is not supported" in str(theirs_error):
            ours = r"^target '.*' is a \w+; LoRA adapts nn\.Linear"
        else:
            assert "not found in the base model" in str(theirs_error), theirs_error
            ours = r"^[Nn]o module matched target_modules="
        with pytest.raises(ValueError, match=ours):
            select_targets(base, LoRAConfig(target_modules=targets))
        return
    assert sorted(select_targets(base, LoRAConfig(target_modules=targets))) == peft_adapted_names(
        theirs
    )


LAYER_FILTERS = [  # (family, target_modules, layers_to_transform, layers_pattern)
    ("llama", ["q_proj", "v_proj"], [1], None),
    ("llama", ["self_attn.q_proj", "mlp.up_proj"], 0, "layers"),
    # a full name is adapted whatever its layer index, a suffix only in the listed layers
    ("llama", ["model.layers.0.self_attn.q_proj", "v_proj"], [1], None),
    ("llama", ["model.layers.1.mlp.down_proj", "q_proj"], 0, "layers"),
    ("llama", ["model.layers.1.self_attn.k_proj"], 0, None),  # only a full name, "filtered out"
    ("llama", ["lm_head", "o_proj"], [0, 1], ["layers"]),  # a full name with no layer index
    ("gpt2", ["transformer.h.0.attn.c_attn", "c_proj"], [1], "h"),
    ("bert", ["bert.encoder.layer.1.attention.self.query", "value"], 0, "layer"),
    ("llama", r"model\.layers\.0\..*_proj", None, None),  # a regex: no layer filter allowed
]


@pytest.mark.parametrize(
    ("family", "targets", "layers", "pattern"),
    LAYER_FILTERS,
    ids=[f"{case[0]}-{i}" for i, case in enumerate(LAYER_FILTERS)],
)
def test_layer_filter_picks_the_modules_peft_picks(family, targets, layers, pattern):
    """peft's ``check_target_module_exists``: a module named whole in ``target_modules`` is
    adapted before ``layers_to_transform`` / ``layers_pattern`` are looked at."""
    base = MODELS[family]()
    kwargs = {"target_modules": targets, "layers_to_transform": layers, "layers_pattern": pattern}
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    ours = sorted(select_targets(base, LoRAConfig(**kwargs)))
    assert ours == peft_adapted_names(theirs)
    modules = dict(base.named_modules())
    assert {t for t in targets if t in modules} <= set(ours)  # every full name, for a list


@pytest.mark.parametrize(
    "extra",
    [
        {"layers_to_transform": [1]},
        {"layers_to_transform": 0, "layers_pattern": "layers"},
        {"exclude_modules": ["model.layers.0.self_attn.q_proj"]},
        {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {r"layers\.1\.self_attn\.q_proj": 32}},
    ],
)
def test_layers_exclusions_and_patterns_match_peft(extra, tmp_path):
    base = tiny_llama_with_bias_free_head()
    kwargs = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "init_lora_weights": False,
        **extra,
    }
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    ours = copy.deepcopy(base)
    inject_adapters(ours, LoRAConfig(**kwargs))
    assert sorted(select_targets(base, LoRAConfig(**kwargs))) == peft_adapted_names(theirs)
    theirs.save_pretrained(tmp_path)
    ours_loaded = load_adapter(copy.deepcopy(base), tmp_path)
    for name in peft_adapted_names(theirs):
        layer = ours_loaded.get_submodule(name)
        their_layer = theirs.base_model.model.get_submodule(name)
        assert layer.r == their_layer.r["default"]
        assert layer.scaling == pytest.approx(their_layer.scaling["default"])
    ids = tokens()
    torch.testing.assert_close(logits(ours_loaded, ids), logits(theirs, ids), rtol=1e-5, atol=1e-5)


def tiny_llama_with_bias_free_head():
    return MODELS["llama"]()


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_options_train_what_peft_trains_and_round_trip(bias, tmp_path):
    base = MODELS["gpt2"]()
    kwargs = {"r": 2, "target_modules": ["c_attn"], "bias": bias, "init_lora_weights": False}
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    ours = copy.deepcopy(base)
    inject_adapters(ours, LoRAConfig(**kwargs))
    their_trainable = set(peft_lora_grads_names(theirs))
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == their_trainable
    with torch.no_grad():  # make the biases differ from the base so the file matters
        for name, p in ours.named_parameters():
            if name.endswith("bias") and p.requires_grad:
                p.add_(0.1)
    save_adapter(ours, tmp_path)
    reloaded = load_adapter(copy.deepcopy(base), tmp_path)
    theirs_loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ids = tokens()
    torch.testing.assert_close(logits(reloaded, ids), logits(ours, ids))
    torch.testing.assert_close(logits(theirs_loaded, ids), logits(ours, ids), rtol=1e-5, atol=1e-5)


def peft_lora_grads_names(peft_model):
    names = []
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            name = name.removeprefix("base_model.model.").replace(".default", "")
            names.append(
                name.replace(".base_layer", "")
                .replace("lora_A.weight", "lora_A")
                .replace("lora_B.weight", "lora_B")
            )
    return names


def test_modules_to_save_trains_saves_and_round_trips(tmp_path):
    base = MODELS["bert"]()
    kwargs = {"r": 4, "target_modules": ["query", "value"], "modules_to_save": ["classifier"]}
    ours = copy.deepcopy(base)
    inject_adapters(ours, LoRAConfig(**kwargs))
    assert ours.classifier.weight.requires_grad and ours.classifier.bias.requires_grad
    assert "classifier.weight" in adapter_state_dict(ours)
    with torch.no_grad():
        ours.classifier.weight.mul_(2.0)
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ids = tokens()
    torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        logits(load_adapter(copy.deepcopy(base), tmp_path), ids), logits(ours, ids)
    )


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merge_unmerge_unload(family, variant):
    base = MODELS[family]()
    model = copy.deepcopy(base)
    inject_adapters(
        model,
        LoRAConfig(
            r=4, target_modules=TARGETS[family], init_lora_weights=False, **VARIANTS[variant]
        ),
    )
    ids = tokens()
    adapted = logits(model, ids)
    weights_before = {k: v.clone() for k, v in model.state_dict().items()}
    assert merge_adapters(model) > 0
    merge_adapters(model)  # idempotent
    torch.testing.assert_close(logits(model, ids), adapted, rtol=1e-5, atol=1e-5)
    unmerge_adapters(model)
    unmerge_adapters(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, weights_before[key], rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(logits(model, ids), adapted, rtol=1e-5, atol=1e-6)

    unloaded = unload(copy.deepcopy(model), merge=True)
    assert unloaded.state_dict().keys() == base.state_dict().keys()
    assert type(
        unloaded.get_submodule(select_targets(base, LoRAConfig(target_modules=TARGETS[family]))[0])
    ).__name__ in ("Linear", "Conv1D")
    torch.testing.assert_close(logits(unloaded, ids), adapted, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(unload(model, merge=False), ids), logits(base, ids))
