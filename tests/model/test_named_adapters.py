"""Named adapters on one frozen base, against peft's named adapters (``add_adapter``,
``set_adapter``, ``load_adapter(..., adapter_name=)``, ``delete_adapter``, ``merge_adapter``):
three adapters with different ranks, α, targets and variants, both save/load directions,
several active at once, merge/unmerge/unload by name, delete, the name refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from lightning_peft import (
    IA3Config,
    LoRAConfig,
    active_adapters,
    adapter_names,
    adapter_state_dict,
    delete_adapter,
    disable_adapters,
    inject_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
    set_active_adapters,
    unload,
    unmerge_adapters,
)
from lightning_peft.model.sites import layer_named
from tests.helpers.tiny_models import assert_unchanged, snapshot, tiny_llama, tokens

# name -> (peft's LoraConfig fields); "fr" is DoRA, "de" rsLoRA; random B so each adapter acts.
ADAPTERS = {
    "default": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "fr": {"r": 2, "lora_alpha": 3, "target_modules": ["v_proj", "o_proj"], "use_dora": True},
    "de": {
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["q_proj", "k_proj", "up_proj"],
        "use_rslora": True,
    },
}
TOL = {"atol": 2e-5, "rtol": 1e-4}


def peft_three():
    torch.manual_seed(3)
    model = None
    for name, fields in ADAPTERS.items():
        config = LoraConfig(init_lora_weights=False, **fields)
        if model is None:
            model = get_peft_model(tiny_llama(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    return model.eval()


def ours_three():
    torch.manual_seed(4)
    model = tiny_llama()
    for name, fields in ADAPTERS.items():
        inject_adapters(model, LoRAConfig(init_lora_weights=False, **fields), name=name)
    return model.eval()


def out(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def peft_active(model, names):
    model.base_model.set_adapter(names if len(names) > 1 else names[0])


# -- both directions ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peft_saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("peft")
    theirs = peft_three()
    theirs.save_pretrained(directory)
    return theirs, directory


# Several at once: the DoRA adapter first (peft takes each DoRA delta relative to the output so
# far; ours relative to the base W: the two agree when DoRA comes first).
ACTIVE = [["default"], ["fr"], ["de"], ["fr", "default", "de"], ["default", "de"]]


@pytest.mark.parametrize("active", ACTIVE, ids="+".join)
def test_three_adapters_saved_by_peft_load_here_by_name_with_peft_s_outputs(peft_saved, active):
    theirs, directory = peft_saved
    assert sorted(p.name for p in directory.iterdir() if p.is_dir()) == ["de", "fr"]
    ours = tiny_llama()
    load_adapter(ours, directory)
    load_adapter(ours, directory / "fr", name="fr")
    load_adapter(ours, directory / "de", name="de")
    assert adapter_names(ours) == ["default", "fr", "de"]
    assert active_adapters(ours) == ["default"]  # loading beside keeps the active set (peft)
    set_active_adapters(ours, active)
    peft_active(theirs, active)
    ids = tokens()
    torch.testing.assert_close(out(ours, ids), out(theirs, ids), **TOL)


def test_three_adapters_saved_here_load_in_peft_by_name_with_our_outputs(tmp_path):
    ours = ours_three()
    save_adapter(ours, tmp_path)
    assert (tmp_path / "adapter_config.json").is_file()
    assert (tmp_path / "fr" / "adapter_model.safetensors").is_file()
    theirs = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    for name in ("fr", "de"):
        theirs.load_adapter(tmp_path / name, adapter_name=name)
    theirs.eval()
    ids = tokens()
    for active in ACTIVE:
        set_active_adapters(ours, active)
        peft_active(theirs, active)
        torch.testing.assert_close(out(ours, ids), out(theirs, ids), **TOL)


def test_the_keys_of_a_named_adapter_s_file_are_peft_s_without_the_name(peft_saved, tmp_path):
    from safetensors.torch import load_file

    _, directory = peft_saved
    ours = ours_three()
    save_adapter(ours, tmp_path, names=["fr"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fr"]
    mine = load_file(tmp_path / "fr" / "adapter_model.safetensors")
    theirs = load_file(directory / "fr" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}


# -- the layout: the single-adapter model is unchanged ------------------------------------------


def test_a_second_adapter_adds_only_its_own_tensors_to_the_state_dict():
    one = tiny_llama()
    inject_adapters(one, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    keys = set(one.state_dict())
    inject_adapters(one, LoRAConfig(r=2, target_modules=["v_proj", "o_proj"]), name="fr")
    added = set(one.state_dict()) - keys
    assert keys <= set(one.state_dict())
    assert added and all(k.rpartition(".")[2] in ("lora_A", "lora_B") for k in added)
    assert any(".v_proj.named_adapters.fr.lora_A" in k for k in added)  # beside "default"
    assert any(k.endswith("o_proj.lora_A") for k in added)  # alone there: the site's own
    # the base tensors are shared, not copied, and counted once
    site = one.model.layers[0].self_attn.v_proj
    assert site.named_adapters["fr"].weight is site.weight
    assert len(list(one.parameters())) == len({id(p) for p in one.parameters()})
    copy_ = tiny_llama()
    inject_adapters(copy_, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    inject_adapters(copy_, LoRAConfig(r=2, target_modules=["v_proj", "o_proj"]), name="fr")
    copy_.load_state_dict(one.state_dict())  # strict: nothing missing, nothing unexpected


def test_one_active_adapter_runs_the_plain_forward_and_only_active_adapters_train():
    model = ours_three()
    site = model.model.layers[0].self_attn.q_proj
    assert site.router is None  # "default" alone active: the single-adapter forward
    set_active_adapters(model, ["default", "de"])
    assert site.router is not None
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in adapter_state_dict(model, "default")} | set(
        adapter_state_dict(model, "de")
    )
    with pytest.raises(ValueError, match="several adapters are active"):
        adapter_state_dict(model)
    set_active_adapters(model, "de")
    assert model.model.layers[0].self_attn.k_proj.router is None  # "de" is the site's own
    assert site.named_adapters["de"].lora_A.requires_grad and not site.lora_A.requires_grad


# -- merge, unmerge, unload, disable, delete by name, against peft -------------------------------


def test_merge_unmerge_and_unload_by_name_equal_peft_s(peft_saved):
    theirs_saved, directory = peft_saved
    theirs = copy.deepcopy(theirs_saved)
    ours = tiny_llama()
    for name in ADAPTERS:
        load_adapter(ours, directory / ("" if name == "default" else name), name=name)
    ids = tokens()
    set_active_adapters(ours, ["default", "de"])
    peft_active(theirs, ["default", "de"])
    before = out(ours, ids)
    assert merge_adapters(ours) == 4 + 6  # default: q, v; de: q, k, up; in 2 decoder layers
    theirs.base_model.merge_adapter(adapter_names=["default", "de"])
    torch.testing.assert_close(out(ours, ids), before, **TOL)
    torch.testing.assert_close(out(ours, ids), out(theirs, ids), **TOL)
    unmerge_adapters(ours)
    theirs.base_model.unmerge_adapter()
    torch.testing.assert_close(out(ours, ids), before, **TOL)
    plain = unload(copy.deepcopy(ours), names=["fr"])
    their_plain = copy.deepcopy(theirs).merge_and_unload(adapter_names=["fr"])
    torch.testing.assert_close(out(plain, ids), out(their_plain, ids), **TOL)
    assert not any("lora" in n for n, _ in plain.named_parameters())
    with disable_adapters(ours):
        torch.testing.assert_close(out(ours, ids), out(tiny_llama(), ids), **TOL)
    with disable_adapters(ours, names=["de"]):
        theirs.set_adapter("default")
        torch.testing.assert_close(out(ours, ids), out(theirs, ids), **TOL)


def test_delete_promotes_a_named_adapter_and_outputs_stay_peft_s(peft_saved):
    theirs_saved, directory = peft_saved
    theirs = copy.deepcopy(theirs_saved)
    ours = tiny_llama()
    for name in ADAPTERS:
        load_adapter(ours, directory / ("" if name == "default" else name), name=name)
    set_active_adapters(ours, ["fr", "default"])
    delete_adapter(ours, "default")
    theirs.delete_adapter("default")
    assert adapter_names(ours) == ["fr", "de"] and active_adapters(ours) == ["fr"]
    site = ours.model.layers[0].self_attn.v_proj  # "fr" took the place of "default" here
    assert site.adapter_name == "fr" and not site.nested and not hasattr(site, "named_adapters")
    q = ours.model.layers[0].self_attn.q_proj
    assert q.adapter_name == "de" and not q.nested
    ids = tokens()
    for name in ("fr", "de"):
        set_active_adapters(ours, name)
        theirs.set_adapter(name)
        torch.testing.assert_close(out(ours, ids), out(theirs, ids), **TOL)
    delete_adapter(ours, "fr")
    assert isinstance(ours.model.layers[0].self_attn.o_proj, nn.Linear)
    with pytest.raises(ValueError, match="only adapter; unload"):
        delete_adapter(ours, "de")


def test_ia3_adapters_active_together_multiply_as_peft_s():
    from peft import IA3Config as PeftIA3

    fields = [
        {"target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
        {"target_modules": ["k_proj", "v_proj"], "feedforward_modules": []},
    ]
    torch.manual_seed(5)
    theirs = get_peft_model(tiny_llama(), PeftIA3(init_ia3_weights=False, **fields[0]))
    theirs.add_adapter("b", PeftIA3(init_ia3_weights=False, **fields[1]))
    ours = tiny_llama()
    inject_adapters(ours, IA3Config(**fields[0]))
    inject_adapters(ours, IA3Config(**fields[1]), name="b")
    with torch.no_grad():  # copy peft's vectors
        for name, param in theirs.named_parameters():
            if "ia3_l" in name:
                adapter = name.rpartition(".")[2]
                path = name.removeprefix("base_model.model.").replace(f".ia3_l.{adapter}", "")
                layer_named(ours.get_submodule(path), adapter).ia3_l.copy_(param)
    ids = tokens()
    set_active_adapters(ours, ["default", "b"])
    theirs.base_model.set_adapter(["default", "b"])
    torch.testing.assert_close(out(ours, ids), out(theirs.eval(), ids), **TOL)


# -- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("", "empty"),
        ("..", r"'\.', '/'"),
        ("a/b", r"'\.', '/'"),
        ("a\\b", r"'\.', '/'"),
        ("v1.2", r"'\.', '/'"),
        ("__base__", "mixed batch"),
        ("keys", "attribute"),
        ("merge", "attribute"),
        (" x", "whitespace"),
        ("fr", "already has an adapter named 'fr'"),
    ],
)
def test_names_that_cannot_be_keys_and_directories_are_refused_leaving_the_model(name, match):
    model = ours_three()
    before, tree = snapshot(model), [n for n, _ in model.named_modules()]
    with pytest.raises(ValueError, match=match):
        inject_adapters(model, LoRAConfig(target_modules=["k_proj"]), name=name)
    assert_unchanged(model, before)
    assert [n for n, _ in model.named_modules()] == tree


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (IA3Config(target_modules=["k_proj"], feedforward_modules=[]), "share a method"),
        (LoRAConfig(target_modules=["k_proj"], bias="all"), "bias='none'"),
        (LoRAConfig(target_modules=["k_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
        (LoRAConfig(target_modules=["k_proj"], init_lora_weights="pissa"), "rewrites the base"),
    ],
)
def test_adapters_that_cannot_sit_beside_others_are_refused_by_name(config, match):
    model = ours_three()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        inject_adapters(model, config, name="x")
    assert_unchanged(model, before)


def test_unknown_names_are_refused_before_anything_changes(tmp_path):
    model = ours_three()
    before = snapshot(model)
    for call in (
        lambda: set_active_adapters(model, ["default", "it"]),
        lambda: delete_adapter(model, "it"),
        lambda: merge_adapters(model, names=["it"]),
        lambda: save_adapter(model, tmp_path, names=["de", "it"]),
    ):
        with pytest.raises(ValueError, match="no adapter named 'it'"):
            call()
    assert_unchanged(model, before)
    assert active_adapters(model) == ["default"] and not any(tmp_path.iterdir())
