"""Never silently wrong (issue 8, items 5, 7, 8, 10, 11 and the targeting messages): each bad
input gets its message, and the model and the files on disk are exactly as before."""

import copy
import dataclasses
import json
import os
import re
import shlex
from collections import OrderedDict

import pytest
import torch
from torch import nn

import lightning_peft.peft_format.files as hf_format
from lightning_peft import (
    AdapterConfig,
    LoRAConfig,
    inject_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
    unload,
    unmerge_adapters,
)
from lightning_peft.methods.lora.config import (
    PEFT_IGNORED_FIELDS,
    PEFT_ONLY_FIELDS,
    PEFT_UNSUPPORTED_FIELDS,
)
from lightning_peft.model.targeting import select_targets
from tests.helpers.peft_interop import peft_adapted_names
from tests.helpers.tiny_models import MODELS, assert_unchanged, files, logits, snapshot, tokens

peft = pytest.importorskip("peft")


def peft_saved(tmp_path, family="llama", safe_serialization=True, **kwargs):
    """A peft LoRA adapter directory (random A and B) for the tiny ``family`` model;
    ``safe_serialization=False``: peft's older adapter_model.bin."""
    base = MODELS[family]()
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **kwargs
    )
    peft_model = peft.get_peft_model(copy.deepcopy(base), config)
    peft_model.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    return base, tmp_path


def edit_config(directory, **changes) -> None:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# -- 7. the adapter format ----------------------------------------------------------------------


def test_module_held_in_two_places_saves_and_loads_as_peft(tmp_path):
    base = MODELS["llama"]()
    base.model.last_layer = base.model.layers[-1]  # two containers hold one decoder layer
    kwargs = {"r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
    ours = copy.deepcopy(base)
    inject_adapters(ours, LoRAConfig(**kwargs))
    save_adapter(ours, tmp_path / "ours")  # safetensors refused shared tensors here before
    peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs)).save_pretrained(
        tmp_path / "theirs"
    )
    from safetensors.torch import load_file

    ours_keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert ours_keys == set(load_file(tmp_path / "theirs" / "adapter_model.safetensors"))
    assert not any("last_layer" in key for key in ours_keys)  # once, under the first name
    ids = tokens()
    expected = logits(ours, ids)
    torch.testing.assert_close(
        logits(load_adapter(copy.deepcopy(base), tmp_path / "ours"), ids), expected
    )
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(logits(theirs, ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_module_held_in_two_places_merges_once_as_peft(tmp_path, use_dora):
    """One decoder layer reached by two paths: its adapter layers are one layer each, whose
    weights no *other* module holds; merge (and unmerge) run once, the merged model equals
    peft's, and save/load still works after the round trip."""
    base = MODELS["llama"]()
    base.model.last_layer = base.model.layers[-1]
    kwargs = {"r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
    ours = copy.deepcopy(base)
    inject_adapters(ours, LoRAConfig(use_dora=use_dora, **kwargs))
    q_proj = ours.model.layers[-1].self_attn.q_proj
    assert ours.model.last_layer.self_attn.q_proj is q_proj
    save_adapter(ours, tmp_path)
    ids = tokens()
    unmerged, weight = logits(ours, ids), q_proj.weight.clone()
    assert merge_adapters(ours) == 4  # two layers x (q_proj, v_proj), each once
    assert q_proj.merged
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).merge_and_unload()
    their_q_proj = theirs.model.layers[-1].self_attn.q_proj
    torch.testing.assert_close(q_proj.weight, their_q_proj.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(ours, ids), unmerged, rtol=1e-5, atol=1e-5)
    assert unmerge_adapters(ours) == 4 and not q_proj.merged
    torch.testing.assert_close(q_proj.weight, weight, rtol=0, atol=1e-6)  # unmerged once
    torch.testing.assert_close(logits(ours, ids), unmerged, rtol=1e-6, atol=1e-6)
    save_adapter(ours, tmp_path / "again")
    reloaded = load_adapter(copy.deepcopy(base), tmp_path / "again")
    torch.testing.assert_close(logits(reloaded, ids), unmerged)
    plain = unload(ours)  # merges, and both paths get the plain module back
    assert type(plain.model.last_layer.self_attn.q_proj) is nn.Linear
    assert plain.model.last_layer is plain.model.layers[-1]
    torch.testing.assert_close(logits(plain, ids), unmerged, rtol=1e-5, atol=1e-5)


def test_one_module_under_two_parents_is_refused():
    shared = nn.Linear(6, 6)
    model = nn.Sequential(
        OrderedDict(
            a=nn.Sequential(shared, nn.ReLU()), b=nn.Sequential(shared), head=nn.Linear(6, 2)
        )
    )
    before = snapshot(model)
    with pytest.raises(ValueError) as error:
        inject_adapters(model, LoRAConfig(r=2, target_modules=["a.0"]))
    assert str(error.value).startswith(
        "the module 'a.0' is also at 'b.0' (one module in two places)"
    )
    assert_unchanged(model, before)
    assert type(model.a[0]) is nn.Linear and model.a[0] is model.b[0]


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_olora_is_peft_olora_and_its_adapters_load_with_peft_numbers(tmp_path, use_dora):
    base = MODELS["llama"]()
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "use_dora": use_dora}
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(init_lora_weights="olora", **kwargs)
    )
    ours = copy.deepcopy(base)
    inject_adapters(ours, LoRAConfig(init_lora_weights="olora", **kwargs))
    their_layer = theirs.base_model.model.model.layers[1].self_attn.v_proj
    our_layer = ours.model.layers[1].self_attn.v_proj
    assert torch.equal(our_layer.lora_A, their_layer.lora_A["default"].weight)
    assert torch.equal(our_layer.lora_B, their_layer.lora_B["default"].weight)
    assert torch.equal(our_layer.weight, their_layer.base_layer.weight)  # the same residual
    with torch.no_grad():  # as if trained
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path)
    ids = tokens()
    peft_loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ours_loaded = load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(
        logits(ours_loaded, ids), logits(peft_loaded, ids), rtol=1e-5, atol=1e-5
    )


def test_olora_on_conv1d_is_refused():
    model = MODELS["gpt2"]()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"olora on 'transformer\.h\.0\.attn\.c_attn', a Conv1D"):
        inject_adapters(
            model, LoRAConfig(r=2, target_modules=["c_attn"], init_lora_weights="olora")
        )
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("init", "why"),
    [
        ("pissa_niter_4", "randomized SVD"),
        ("corda", "rewrites the base weight"),
        ("loftq", "quantizes the base weight"),
        ("lora_ga", "rewrites the base weight"),
        ("mica", "B frozen"),
        ("an_init_from_the_future", "is not known here"),
    ],
)
def test_inits_that_cannot_load_with_peft_numbers_are_refused_by_name(tmp_path, init, why):
    base, directory = peft_saved(tmp_path)
    edit_config(directory, init_lora_weights=init)
    model = copy.deepcopy(base)
    before, on_disk = snapshot(model), files(directory)
    with pytest.raises(ValueError) as error:
        load_adapter(model, directory)
    message = str(error.value)
    assert message.startswith(f"{directory / 'adapter_config.json'}: init_lora_weights={init!r}")
    assert why in message and "refused" in message
    assert_unchanged(model, before)
    assert files(directory) == on_disk


@pytest.mark.parametrize("init", ["eva", "orthogonal"])
def test_inits_that_only_set_the_starting_point_load_as_peft_loads_them(tmp_path, init):
    base, directory = peft_saved(tmp_path)
    edit_config(directory, init_lora_weights=init)
    ids = tokens()
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), directory)
    ours = load_adapter(copy.deepcopy(base), directory)
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{'r': 4,", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object, got a JSON list"),
        ('"LORA"', "must hold a JSON object, got a JSON str"),
    ],
)
def test_config_that_is_not_a_json_object_names_the_file(tmp_path, content, match):
    base, directory = peft_saved(tmp_path)
    (directory / "adapter_config.json").write_text(content)
    model = copy.deepcopy(base)
    before, on_disk = snapshot(model), files(directory)
    with pytest.raises(ValueError) as error:
        load_adapter(model, directory)
    assert str(error.value).startswith(f"{directory / 'adapter_config.json'}")
    assert match in str(error.value)
    assert_unchanged(model, before)
    assert files(directory) == on_disk


def test_unreadable_weights_file_names_it(tmp_path):
    base, directory = peft_saved(tmp_path)
    (directory / "adapter_model.safetensors").write_bytes(b"\x00" * 5)
    model = copy.deepcopy(base)
    before = snapshot(model)
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        load_adapter(model, directory)
    assert_unchanged(model, before)


# -- peft's older adapter_model.bin (issue 17, item 3) ------------------------------------------


@pytest.mark.parametrize("use_dora", [False, True])
def test_a_peft_adapter_saved_as_bin_loads_with_peft_s_outputs(tmp_path, use_dora):
    base, directory = peft_saved(tmp_path, use_dora=use_dora, safe_serialization=False)
    assert sorted(files(directory)) == ["README.md", "adapter_config.json", "adapter_model.bin"]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), directory)
    ours = load_adapter(copy.deepcopy(base), directory)
    ids = tokens()
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=1e-5, atol=1e-5)


class RunsCode:
    """A pickle that, unpickled, runs a shell command (here: creates ``marker``)."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def bin_with(directory, tensors, payload) -> None:
    """Replace the adapter's weights with ``adapter_model.bin`` holding ``tensors`` + payload."""
    torch.save({**tensors, **payload}, directory / "adapter_model.bin")


def test_a_bin_that_carries_code_is_refused_and_never_run(tmp_path):
    base, directory = peft_saved(tmp_path / "adapter", safe_serialization=False)
    weights = directory / "adapter_model.bin"
    marker = tmp_path / "marker"
    bin_with(directory, torch.load(weights, weights_only=True), {"extra": RunsCode(marker)})
    model = copy.deepcopy(base)
    before, on_disk = snapshot(model), files(directory)
    with pytest.raises(ValueError) as refused:
        load_adapter(model, directory)
    module = os.system.__module__  # posix
    assert str(refused.value) == (
        f"{weights} was not loaded: it holds objects other than tensors (Trying to load "
        f"unsupported GLOBAL {module}.system whose module {module} is blocked.); nothing in it "
        "was run. "
        "peft writes only tensors there: save the adapter again with peft's save_pretrained "
        "(adapter_model.safetensors) from a source you trust"
    )
    assert not marker.exists()  # the command never ran
    assert_unchanged(model, before)
    assert files(directory) == on_disk
    torch.load(weights, weights_only=False)  # the payload is live: unpickled, it runs
    assert marker.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"extra": 3}, "'extra' is of type int, not a tensor; an adapter file holds only "
         "tensors, keyed by name"),
        ({"extra": [torch.zeros(1)]}, "'extra' is of type list, not a tensor"),
        ({7: torch.zeros(1)}, "the key 7 (of type int) is not a name; an adapter file holds"),
    ],
)  # fmt: skip
def test_a_bin_with_anything_but_named_tensors_is_refused_by_name(tmp_path, content, message):
    base, directory = peft_saved(tmp_path, safe_serialization=False)
    weights = directory / "adapter_model.bin"
    bin_with(directory, torch.load(weights, weights_only=True), content)
    with pytest.raises(ValueError, match=f"^{re.escape(f'{weights}: {message}')}"):
        load_adapter(copy.deepcopy(base), directory)
    torch.save([torch.zeros(1)], weights)
    with pytest.raises(ValueError, match=f"^{re.escape(f'{weights} holds a list, not a dict')}"):
        load_adapter(copy.deepcopy(base), directory)
    weights.write_bytes(b"\x00" * 5)
    with pytest.raises(
        ValueError, match=f"^{re.escape(f'{weights} is not a readable torch.save')}"
    ):
        load_adapter(copy.deepcopy(base), directory)


def test_safetensors_wins_over_bin_and_neither_says_what_is_there(tmp_path):
    base, directory = peft_saved(tmp_path / "adapter")  # adapter_model.safetensors
    marker = tmp_path / "marker"
    bin_with(directory, {}, {"extra": RunsCode(marker)})  # never opened: safetensors is read
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), directory)
    ours = load_adapter(copy.deepcopy(base), directory)
    ids = tokens()
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=1e-5, atol=1e-5)
    assert not marker.exists()

    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        (directory / name).unlink()
    (directory / "weights.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as refused:
        load_adapter(copy.deepcopy(base), directory)
    assert str(refused.value) == (
        f"{directory} has no adapter_model.safetensors or adapter_model.bin (it holds README.md, "
        "adapter_config.json, weights.pt)"
    )


# -- 5. where a save writes ---------------------------------------------------------------------


def adapted_llama(seed: int = 0, **kwargs):
    model = MODELS["llama"]()
    inject_adapters(
        model, LoRAConfig(r=2, target_modules=["q_proj"], init_lora_weights=False, **kwargs)
    )
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B.fill_(seed)
    return model


def test_an_existing_adapter_is_not_overwritten_without_overwrite(tmp_path):
    save_adapter(adapted_llama(seed=1), tmp_path)
    on_disk = files(tmp_path)
    with pytest.raises(FileExistsError) as error:
        save_adapter(adapted_llama(seed=2), tmp_path)
    assert str(error.value) == (
        f"{tmp_path} already holds an adapter (adapter_config.json); pass overwrite=True to "
        "replace it, or choose another directory"
    )
    assert files(tmp_path) == on_disk
    save_adapter(adapted_llama(seed=2), tmp_path, overwrite=True)
    loaded = load_adapter(MODELS["llama"](), tmp_path)
    assert (loaded.model.layers[0].self_attn.q_proj.lora_B == 2).all()
    assert sorted(files(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_saving_next_to_other_files_keeps_them(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    save_adapter(adapted_llama(), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_file_in_the_way_is_refused(tmp_path):
    (tmp_path / "adapter").write_text("a file")
    with pytest.raises(FileExistsError, match="is a file, not an adapter directory"):
        save_adapter(adapted_llama(), tmp_path / "adapter")
    assert (tmp_path / "adapter").read_text() == "a file"


def test_a_save_that_fails_while_writing_leaves_the_old_adapter(tmp_path, monkeypatch):
    save_adapter(adapted_llama(seed=1), tmp_path)
    on_disk = files(tmp_path)

    def half_written(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(hf_format, "save_file", half_written)
    with pytest.raises(OSError, match="No space left"):
        save_adapter(adapted_llama(seed=2), tmp_path, overwrite=True)
    assert files(tmp_path) == on_disk  # no temporary file left either


def test_a_save_interrupted_between_renames_leaves_no_mixed_adapter(tmp_path, monkeypatch):
    save_adapter(adapted_llama(seed=1), tmp_path)
    real_replace, calls = os.replace, []

    def interrupted(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the config's rename
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(hf_format.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(adapted_llama(seed=2), tmp_path, overwrite=True)
    monkeypatch.undo()
    assert sorted(files(tmp_path)) == ["adapter_model.safetensors"]  # new weights, no old config
    with pytest.raises(FileNotFoundError, match="not an adapter directory"):
        load_adapter(MODELS["llama"](), tmp_path)


# -- 8. peft's configs --------------------------------------------------------------------------


def test_every_peft_lora_field_is_known():
    """A field peft adds must be sorted into kept, ignored (inert) or refused: this fails until
    it is, rather than letting it raise a bare TypeError or be dropped silently."""
    kept = {f.name for f in dataclasses.fields(LoRAConfig)} - set(PEFT_ONLY_FIELDS)
    theirs = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert theirs - kept - set(PEFT_IGNORED_FIELDS) - set(PEFT_UNSUPPORTED_FIELDS) == set()
    assert not kept & set(PEFT_ONLY_FIELDS)
    assert not set(PEFT_UNSUPPORTED_FIELDS) & set(PEFT_IGNORED_FIELDS)


def test_peft_config_with_everyday_fields_carries_over():
    base = MODELS["llama"]()
    theirs_config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
        fan_in_fan_out=False,
        inference_mode=True,
        base_model_name_or_path="HuggingFaceTB/tiny",
        revision="main",
        use_rslora=True,
    )
    config = LoRAConfig(**theirs_config.to_dict())
    plain = LoRAConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
        use_rslora=True,
    )
    assert config == plain
    assert dataclasses.replace(config, r=2).r == 2
    theirs = peft.get_peft_model(copy.deepcopy(base), theirs_config)
    assert sorted(select_targets(base, config)) == peft_adapted_names(theirs)


@pytest.mark.parametrize("field", list(PEFT_UNSUPPORTED_FIELDS))
def test_peft_fields_that_would_change_the_model_are_refused_by_name(field):
    value = True if PEFT_UNSUPPORTED_FIELDS[field] is False else ["model.layers.0.mlp"]
    with pytest.raises(ValueError) as error:
        LoRAConfig(target_modules=["q_proj"], **{field: value})
    assert str(error.value).startswith(f"{field}={value!r} is not supported here")


@pytest.mark.parametrize("field", [f for f in PEFT_IGNORED_FIELDS if f != "peft_type"])
def test_peft_fields_that_do_not_change_the_model_are_accepted(field):
    value = {"fan_in_fan_out": True, "inference_mode": True}.get(field, "something")
    config = LoRAConfig(target_modules=["q_proj"], **{field: value})
    assert config == LoRAConfig(target_modules=["q_proj"])
    assert config.to_dict() == LoRAConfig(target_modules=["q_proj"]).to_dict()
    assert getattr(config, field) == value  # kept as given


def test_a_peft_type_other_than_lora_is_refused():
    with pytest.raises(ValueError, match="peft_type='IA3': a LoRAConfig describes LORA adapters"):
        LoRAConfig(target_modules=["q_proj"], peft_type="IA3")


def test_seq_cls_trains_the_head_in_full_and_loads_in_peft(tmp_path):
    base = MODELS["bert"]()
    kwargs = {
        "r": 4,
        "task_type": "SEQ_CLS",
        "target_modules": "all-linear",
        "init_lora_weights": False,
    }
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    config = LoRAConfig(**kwargs)
    ours = copy.deepcopy(base)
    report = inject_adapters(ours, config)
    assert "classifier" not in select_targets(base, config)
    assert sorted(select_targets(base, config)) == peft_adapted_names(theirs)
    assert report.modules_to_save == ["classifier"]
    assert ours.classifier.weight.requires_grad and ours.classifier.bias.requires_grad
    their_trainable = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert report.trainable_params == their_trainable
    with torch.no_grad():
        ours.classifier.weight.mul_(-2.0)
    save_adapter(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert type(loaded).__name__ == "PeftModelForSequenceClassification"
    ids = tokens()
    torch.testing.assert_close(logits(loaded, ids), logits(ours, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("targets", [r".*\.q_proj", "all-linear"])
def test_layers_to_transform_with_a_string_target_raises_as_in_peft(targets):
    with pytest.raises(ValueError):
        peft.LoraConfig(target_modules=targets, layers_to_transform=[0])
    with pytest.raises(ValueError, match="layers_to_transform cannot be used when target_modules"):
        LoRAConfig(target_modules=targets, layers_to_transform=[0])


def test_unknown_task_type_lists_the_choices():
    with pytest.raises(ValueError, match="task_type must be None or one of"):
        LoRAConfig(target_modules=["q_proj"], task_type="SEQ_CLASSIFICATION")


# -- 10. adapters that never act ----------------------------------------------------------------


def lightning_demo_transformer():
    from lightning.pytorch.demos import Transformer

    torch.manual_seed(0)
    return Transformer(vocab_size=33, ninp=16, nhead=2, nhid=24, nlayers=1, dropout=0.0)


def test_all_linear_skips_multihead_attention_out_proj_and_says_why():
    model = lightning_demo_transformer()
    report = inject_adapters(
        model, LoRAConfig(r=2, target_modules="all-linear", init_lora_weights=False)
    )
    assert [name for name, _ in report.skipped] == [
        "transformer.encoder.layers.0.self_attn.out_proj",
        "transformer.decoder.layers.0.self_attn.out_proj",
        "transformer.decoder.layers.0.multihead_attn.out_proj",
    ]
    assert not any(m.name.endswith("out_proj") for m in report.modules)
    assert (
        "skipped transformer.encoder.layers.0.self_attn.out_proj: the out_proj of "
        "nn.MultiheadAttention 'transformer.encoder.layers.0.self_attn', whose forward reads "
        "out_proj.weight directly and never calls the module"
    ) in str(report)
    model.train()
    ids = torch.randint(0, 33, (5, 2), generator=torch.Generator().manual_seed(0))
    model(ids, ids).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and not p.grad.any()]
    assert no_grad == []  # every adapter acts


@pytest.mark.parametrize(
    "config",
    [
        LoRAConfig(r=2, target_modules=["out_proj"]),
        AdapterConfig(bottleneck_dim=2, target_modules=["out_proj"]),
    ],
    ids=["lora", "adapter"],
)
def test_an_explicit_multihead_attention_out_proj_target_is_refused(config):
    model = lightning_demo_transformer()
    before = snapshot(model)
    with pytest.raises(ValueError) as error:
        inject_adapters(model, config)
    assert str(error.value).startswith(
        "target 'transformer.encoder.layers.0.self_attn.out_proj' is the out_proj of "
        "nn.MultiheadAttention"
    )
    assert "an adapter there would never act" in str(error.value)
    assert_unchanged(model, before)


# -- 11. smaller, and targeting -----------------------------------------------------------------


def test_injecting_twice_says_the_model_has_adapters_and_how_to_remove_them():
    model = MODELS["llama"]()
    config = LoRAConfig(r=2, target_modules=["q_proj"])
    inject_adapters(model, config)
    before = snapshot(model)
    with pytest.raises(ValueError) as error:
        inject_adapters(model, config)
    assert str(error.value) == (
        "the model already has adapters (a LoRALinear at 'model.layers.0.self_attn.q_proj'); "
        "remove them first with unload(model), which merges mergeable ones into the weights, or "
        "unload(model, merge=False), which drops them; then inject again"
    )
    assert_unchanged(model, before)


def test_dora_on_a_weight_row_of_zeros_is_refused_naming_the_row():
    base = MODELS["llama"]()
    with torch.no_grad():
        base.model.layers[1].self_attn.v_proj.weight[3].zero_()
    config = {"r": 2, "target_modules": ["v_proj"], "use_dora": True}
    # peft's DoRA: magnitude ‖W_3‖ = 0 and m/‖W_3 + sBA‖ = 0/0 -> NaN in every output
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    assert logits(theirs, tokens()).isnan().all()
    model = copy.deepcopy(base)
    before = snapshot(model)
    with pytest.raises(ValueError) as error:
        inject_adapters(model, LoRAConfig(**config))
    assert str(error.value).startswith(
        "DoRA cannot adapt 'model.layers.1.self_attn.v_proj': row 3 of its weight is all zeros"
    )
    assert_unchanged(model, before)
    inject_adapters(model, LoRAConfig(r=2, target_modules=["v_proj"]))  # plain LoRA is fine
    assert logits(model, tokens()).isfinite().all()


def test_a_string_target_that_names_a_module_says_to_pass_a_list():
    model = MODELS["llama"]()
    with pytest.raises(ValueError) as error:
        select_targets(model, LoRAConfig(target_modules="q_proj"))
    assert (
        "A string is a regex that must match a module's whole name (e.g. "
        "'model.layers.0.self_attn.q_proj'); pass a list, ['q_proj'], to match by name"
    ) in str(error.value)


def test_targets_filtered_to_nothing_say_what_removed_them():
    with pytest.raises(ValueError) as error:
        select_targets(
            MODELS["llama"](), LoRAConfig(target_modules=["q_proj"], layers_to_transform=[7])
        )
    assert "2 module(s) matched the names" in str(error.value)
    assert "layers_to_transform=[7] (the matches' layer indices: [0, 1])" in str(error.value)


def fake_bitsandbytes_linear4bit():
    """A class as bitsandbytes defines it (an nn.Linear subclass), without importing it."""
    cls = type("Linear4bit", (nn.Linear,), {"__module__": "bitsandbytes.nn.modules"})
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(q_proj=cls(8, 8), out=nn.Linear(8, 2)))


@pytest.mark.parametrize("targets", [["q_proj"], "all-linear"])
def test_quantized_linear_layers_are_refused_by_name(targets):
    model = fake_bitsandbytes_linear4bit()
    before = snapshot(model)
    with pytest.raises(ValueError) as error:
        inject_adapters(model, LoRAConfig(r=2, target_modules=targets))
    # Recognised as bitsandbytes' Linear4bit, never taken for a float layer; its float weight is
    # no quantized one (QLoRA: tests/test_qlora.py).
    assert str(error.value).startswith(
        "target 'q_proj' is a bitsandbytes Linear4bit whose weight is not quantized yet"
    )
    assert_unchanged(model, before)


@pytest.mark.parametrize("layer", ["Linear4bit", "Linear8bitLt"])
def test_real_bitsandbytes_layers_are_refused_by_name(layer):
    bnb = pytest.importorskip("bitsandbytes")
    model = nn.Sequential(OrderedDict(q_proj=getattr(bnb.nn, layer)(8, 8), out=nn.Linear(8, 2)))
    with pytest.raises(ValueError, match=f"target 'q_proj' is a bitsandbytes {layer}"):
        inject_adapters(model, LoRAConfig(r=2, target_modules=["q_proj"]))
