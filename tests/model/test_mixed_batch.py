"""Mixed-adapter batches against peft's ``adapter_names`` (forward and greedy ``generate``), the
``"__base__"`` rows against the base model, ranks and target sets that differ, the layer types
that loop, and the refusals."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_peft import (
    IA3Config,
    LoRAConfig,
    adapter_state_dict,
    inject_adapters,
    merge_adapters,
    save_adapter,
    set_active_adapters,
    unload,
)
from lightning_peft.model.mixed import MIXED_ATTR, mixed_batch, mixed_route
from lightning_peft.model.sites import sites
from tests.helpers.named_adapters import loaded, peft_model
from tests.helpers.tiny_models import tiny_llama, tokens

# different ranks, α and target sets; "de" rsLoRA; none DoRA (peft refuses DoRA in mixed batches)
ADAPTERS = {
    "default": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "fr": {"r": 2, "lora_alpha": 3, "target_modules": ["v_proj", "o_proj"]},
    "de": {
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["q_proj", "k_proj", "up_proj", "down_proj"],
        "use_rslora": True,
    },
}
ROWS = ["fr", "__base__", "de", "default", "fr", "de"]
TOL = {"atol": 2e-5, "rtol": 1e-4}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """peft's model with the three adapters, and ours loaded from its files."""
    directory = tmp_path_factory.mktemp("peft")
    theirs = peft_model(ADAPTERS)
    theirs.save_pretrained(directory)
    return theirs, loaded(directory, ADAPTERS)


def no_mixed_routes(model) -> bool:
    """After a mixed batch (or its refusal) every site routes as before it."""
    return all(
        site.router is not mixed_route and MIXED_ATTR not in site.__dict__
        for _, site in sites(model)
    )


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def test_a_mixed_batch_equals_peft_s_adapter_names_and_each_row_its_own_adapter(pair):
    theirs, ours = pair
    ids = tokens(batch=len(ROWS), length=9)
    expected = logits(theirs, ids, adapter_names=ROWS)
    with mixed_batch(ours, ROWS):
        got = logits(ours, ids)
    torch.testing.assert_close(got, expected, **TOL)
    torch.testing.assert_close(logits(ours, ids, adapter_names=ROWS), expected, **TOL)  # keyword
    # row by row, an independent check: each row as a batch of one with its adapter active
    for i, name in enumerate(ROWS):
        if name == "__base__":
            row = logits(tiny_llama(), ids[i : i + 1])
        else:
            set_active_adapters(ours, name)
            row = logits(ours, ids[i : i + 1])
        torch.testing.assert_close(got[i : i + 1], row, **TOL)
    set_active_adapters(ours, "default")
    assert no_mixed_routes(ours)


def test_a_mixed_batch_under_inference_mode_equals_peft_s(pair):
    """Lightning validates and predicts under torch.inference_mode: its tensors have no version
    counter (the row groups and the factor cache read them elsewhere)."""
    theirs, ours = pair
    ids = tokens(batch=len(ROWS), length=7)
    expected = logits(theirs, ids, adapter_names=ROWS)
    for _ in range(2):  # the second batch finds the factor cache of the first
        with torch.inference_mode(), mixed_batch(ours, ROWS):
            got = ours(input_ids=ids).logits
        torch.testing.assert_close(got, expected, **TOL)
    assert no_mixed_routes(ours)


def test_greedy_generate_with_mixed_rows_equals_peft_s(pair):
    theirs, ours = pair
    ids = tokens(batch=4, length=5)
    names = ["de", "__base__", "fr", "default"]
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    expected = theirs.generate(input_ids=ids, adapter_names=names, **options)
    with mixed_batch(ours, names):
        got = ours.generate(input_ids=ids, **options)
    assert torch.equal(got, expected)
    assert torch.equal(ours.generate(input_ids=ids, adapter_names=names, **options), expected)


def test_beam_search_with_adapter_names_equals_peft_s(pair):
    """peft repeats each name num_beams times; so does our generate."""
    theirs, ours = pair
    ids = tokens(batch=3, length=5)
    names = ["fr", "__base__", "de"]
    options = {"max_new_tokens": 4, "do_sample": False, "num_beams": 2, "pad_token_id": 0}
    expected = theirs.generate(input_ids=ids, adapter_names=names, **options)
    assert torch.equal(ours.generate(input_ids=ids, adapter_names=names, **options), expected)
    with pytest.raises(ValueError, match="repeat each name num_beams times"):
        with mixed_batch(ours, names):  # the context manager takes the rows as they are
            ours.generate(input_ids=ids, **options)
    copied = copy.deepcopy(ours)  # the copy's generate is the copy's
    assert copied.generate.root is copied
    unload(copied, merge=False)
    assert "generate" not in copied.__dict__ and not copied._forward_pre_hooks


def test_unknown_names_and_dora_are_refused_before_any_layer_runs(pair):
    _, ours = pair
    calls = []
    handle = ours.register_forward_pre_hook(lambda *a: calls.append(1))
    ids = tokens(batch=2)
    try:
        with pytest.raises(ValueError, match="no adapter named 'it'"):
            with mixed_batch(ours, ["fr", "it"]):
                ours(input_ids=ids)
        with pytest.raises(ValueError, match="no adapter named 'it'"):
            ours(input_ids=ids, adapter_names=["fr", "it"])
    finally:
        handle.remove()
    assert calls == [] and no_mixed_routes(ours)
    dora = tiny_llama()
    inject_adapters(dora, LoRAConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA adapters cannot run in a mixed batch"):
        with mixed_batch(dora, ["default", "__base__"]):
            pass


def test_a_row_count_that_is_not_the_batch_s_is_refused_naming_the_layer(pair):
    _, ours = pair
    with pytest.raises(ValueError, match=r"a mixed batch of 3 rows .* 'model.layers.0.self_attn"):
        with mixed_batch(ours, ["fr", "de", "fr"]):
            ours(input_ids=tokens(batch=2))
    assert no_mixed_routes(ours)


def test_merged_adapters_are_refused(pair):
    _, ours = pair
    model = copy.deepcopy(ours)
    merge_adapters(model)
    with pytest.raises(ValueError, match="merged into the weights"):
        with mixed_batch(model, ["default", "__base__"]):
            pass


def test_a_single_adapter_model_runs_mixed_rows_and_its_files_are_unchanged(tmp_path):
    model = tiny_llama()
    torch.manual_seed(0)
    inject_adapters(model, LoRAConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    ids = tokens(batch=2)
    adapted = logits(model, ids)
    with mixed_batch(model, ["default", "__base__"]):
        got = logits(model, ids)
    torch.testing.assert_close(got[:1], adapted[:1], **TOL)
    torch.testing.assert_close(got[1:], logits(tiny_llama(), ids)[1:], **TOL)
    save_adapter(model, tmp_path)  # one adapter: still DIR itself
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_embedding_adapters_loop_row_groups():
    model = tiny_llama()
    for name, rank in (("default", 2), ("b", 3)):
        config = LoRAConfig(
            r=rank, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False
        )
        inject_adapters(model, config, name=name)
    ids = tokens(batch=3)
    with mixed_batch(model, ["b", "__base__", "default"]):
        got = logits(model, ids)
    for i, name in ((0, "b"), (2, "default")):
        set_active_adapters(model, name)
        torch.testing.assert_close(got[i : i + 1], logits(model, ids[i : i + 1]), **TOL)
    torch.testing.assert_close(got[1:2], logits(tiny_llama(), ids[1:2]), **TOL)


def test_ia3_adapters_loop_row_groups():
    model = tiny_llama()
    inject_adapters(
        model, IA3Config(target_modules=["k_proj", "down_proj"], init_ia3_weights=False)
    )
    inject_adapters(
        model,
        IA3Config(target_modules=["v_proj"], feedforward_modules=[], init_ia3_weights=False),
        name="b",
    )
    ids = tokens(batch=3)
    with mixed_batch(model, ["b", "default", "__base__"]):
        got = logits(model, ids)
    for i, name in enumerate(["b", "default"]):
        set_active_adapters(model, name)
        torch.testing.assert_close(got[i : i + 1], logits(model, ids[i : i + 1]), **TOL)
    torch.testing.assert_close(got[2:], logits(tiny_llama(), ids[2:]), **TOL)


def test_each_adapter_gets_gradient_from_its_own_rows_only():
    model = tiny_llama()
    torch.manual_seed(1)
    for name, fields in ADAPTERS.items():
        config = LoRAConfig(init_lora_weights=False, lora_dropout=0.0, **fields)
        inject_adapters(model, config, name=name)
    set_active_adapters(model, list(ADAPTERS))  # all train
    model.train()
    rows = ["fr", "de", "fr", "__base__", "de", "default"]

    def grads(ids):
        model.zero_grad()
        with mixed_batch(model, rows):
            model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ids = tokens(batch=len(rows), length=8)
    before = grads(ids)
    changed = ids.clone()
    changed[[1, 4]] = (changed[[1, 4]] + 7) % 64  # the "de" rows only
    after = grads(changed)
    owned = {name: set(adapter_state_dict(model, name)) for name in ADAPTERS}
    for name in owned["default"] | owned["fr"]:  # bit-equal: no other rows reach them
        assert torch.equal(before[name], after[name]), name
    assert any(not torch.equal(before[n], after[n]) for n in owned["de"])


def test_dropout_is_each_row_s_adapter_s():
    """In training, rows of an adapter with dropout 0 equal their eval output; rows of one with
    dropout 0.5 do not (each row takes its adapter's p, one grouped op for all)."""
    model = tiny_llama()
    for name, p in (("default", 0.0), ("b", 0.5)):
        fields = {"r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
        inject_adapters(model, LoRAConfig(lora_dropout=p, **fields), name)
    ids = tokens(batch=4)
    names = ["default", "b", "default", "b"]
    with mixed_batch(model, names):
        evaluated = logits(model.eval(), ids)
        torch.manual_seed(0)
        trained = logits(model.train(), ids)
    torch.testing.assert_close(trained[[0, 2]], evaluated[[0, 2]], **TOL)
    assert not torch.allclose(trained[[1, 3]], evaluated[[1, 3]], **TOL)
