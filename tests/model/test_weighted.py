"""``add_weighted_adapter`` on a model's named adapters against peft 0.21.2: three adapters
saved by peft and loaded here by name, combined in both packages; with the combined adapter
active the outputs equal peft's, its factors peft's bit for bit (dare_*: peft's masks through
``generator``); the new adapter is inactive until set; refusals leave the model unchanged."""

from __future__ import annotations

import pytest
import torch

from lightning_peft import (
    active_adapters,
    adapter_names,
    add_weighted_adapter,
    load_adapter,
    save_adapter,
    set_active_adapters,
)
from lightning_peft.model.sites import layer_named, sites
from tests.helpers.tiny_models import assert_unchanged, logits, snapshot, tiny_llama, tokens

peft = pytest.importorskip("peft")

NAMES = ["fr", "de", "it"]
WEIGHTS = [0.6, -0.3, 1.1]
SAME = [
    {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    {"r": 4, "lora_alpha": 2, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    {"r": 4, "lora_alpha": 16, "target_modules": ["v_proj", "o_proj"], "use_rslora": True},
]
# The same ranks, 2 on v_proj through rank_pattern: per-module ranks in the combination.
PATTERN = [{**c, "rank_pattern": {"v_proj": 2}} for c in SAME]
MIXED = [
    {"r": 2, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    {"r": 4, "lora_alpha": 3, "target_modules": ["q_proj", "k_proj", "v_proj"]},
    {"r": 6, "lora_alpha": 16, "target_modules": ["v_proj", "o_proj", "up_proj"]},
]


def both(tmp_path, configs):
    """peft's model with fr, de, it (random A and B) and ours with the same, loaded by name
    from peft's files."""
    torch.manual_seed(0)
    theirs = None
    for name, fields in zip(NAMES, configs, strict=True):
        config = peft.LoraConfig(init_lora_weights=False, **fields)
        if theirs is None:
            theirs = peft.get_peft_model(tiny_llama(), config, adapter_name=name)
        else:
            theirs.add_adapter(name, config)
    theirs.save_pretrained(tmp_path / "peft", selected_adapters=NAMES)
    ours = tiny_llama()
    for name in NAMES:
        load_adapter(ours, tmp_path / "peft" / name, name=name)
    return theirs, ours


def first_draw_state(monkeypatch, run):
    """The global RNG state at ``run``'s first ``torch.bernoulli``."""
    state = []
    original = torch.bernoulli

    def bernoulli(*args, **kwargs):
        if not state:
            state.append(torch.get_rng_state())
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "bernoulli", bernoulli)
    run()
    monkeypatch.undo()
    return state[0]


@pytest.mark.parametrize(
    ("combination", "configs", "options"),
    [
        ("linear", SAME, {}),
        ("linear", PATTERN, {}),
        ("cat", MIXED, {}),
        ("svd", MIXED, {}),
        ("svd", MIXED, {"svd_rank": 3, "svd_clamp": 0.9, "svd_full_matrices": False}),
        ("ties", SAME, {"density": 0.5, "majority_sign_method": "frequency"}),
        ("dare_ties", SAME, {"density": 0.6}),
        ("dare_linear_svd", MIXED, {"density": 0.5}),
        ("magnitude_prune_svd", MIXED, {"density": 0.5}),
    ],
)
def test_equal_to_peft(tmp_path, monkeypatch, combination, configs, options):
    theirs, ours = both(tmp_path, configs)
    ids = tokens()
    with torch.no_grad():
        before = logits(ours, ids)

    def run():
        theirs.add_weighted_adapter(NAMES, WEIGHTS, "mix", combination, **options)

    generator = None
    if combination.startswith("dare"):
        generator = torch.Generator().set_state(first_draw_state(monkeypatch, run))
    else:
        run()
    add_weighted_adapter(ours, NAMES, WEIGHTS, "mix", combination, generator=generator, **options)
    # Added, not active: the outputs are those of the active adapter before.
    assert adapter_names(ours) == [*NAMES, "mix"] and active_adapters(ours) == ["fr"]
    with torch.no_grad():
        torch.testing.assert_close(logits(ours, ids), before, rtol=0, atol=0)
    assert not any(p.requires_grad for n, p in ours.named_parameters() if ".mix." in n)
    theirs.set_adapter("mix")
    set_active_adapters(ours, "mix")
    with torch.no_grad():
        expected = logits(theirs, ids)
        got = logits(ours, ids)
    assert not torch.allclose(expected, before, atol=1e-3)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    layers = {n: m for n, m in theirs.base_model.model.named_modules() if hasattr(m, "lora_A")}
    count = 0
    for path, site in sites(ours):
        layer = layer_named(site, "mix")
        if layer is None:
            continue
        count += 1
        peft_layer = layers[path]
        assert torch.equal(layer.lora_A, peft_layer.lora_A["mix"].weight), path
        assert torch.equal(layer.lora_B, peft_layer.lora_B["mix"].weight), path
        assert layer.scaling == 1.0
    assert count == sum("mix" in m.lora_A for m in layers.values()) >= 6
    # Saved in the PEFT format, peft loads it with the same outputs.
    save_adapter(ours, tmp_path / "ours", names=["mix"])
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours" / "mix")
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("args", "options", "message"),
    [
        ((["fr", "de"], [1.0, 1.0], "de"), {}, "already has an adapter named 'de'"),
        ((["fr", "es"], [1.0, 1.0], "mix"), {}, "no adapter named 'es'"),
        ((["fr", "de"], [1.0, 1.0], "mix"), {"combination_type": "linear"}, "one rank"),
        ((["fr", "de"], [1.0], "mix"), {}, "one number per adapter"),
        ((["fr", "de"], [1.0, 1.0], "a.b"), {}, "invalid adapter name 'a.b'"),
        ((["fr", "de"], [1.0, 1.0], "mix"), {"combination_type": "ties"}, "needs density"),
        (
            (["fr"], [1.0], "mix"),
            {"combination_type": "ties", "density": 0.5},
            "with a single adapter peft combines linearly and ignores density",
        ),
        ((["fr", "de"], [1.0, 1.0], "mix"), {"svd_driver": "gesvdj"}, "is for CUDA tensors"),
        ((["fr", "de"], [1.0, True], "mix"), {}, "weights must be finite numbers, got True"),
        (("fr", [1.0], "mix"), {}, "adapters must be a non-empty list of adapter names"),
    ],
)
def test_refusals_leave_the_model_unchanged(tmp_path, args, options, message):
    _, ours = both(tmp_path, MIXED)
    before = snapshot(ours)
    with pytest.raises(ValueError, match=message):
        add_weighted_adapter(ours, *args, **options)
    assert_unchanged(ours, before)
    assert adapter_names(ours) == NAMES


def test_model_and_directories_give_the_same_adapter(tmp_path):
    """``add_weighted_adapter`` on the model and ``combine_adapter_dirs`` on the parts' saved
    directories write the same tensors (the deterministic combinations do not depend on the
    order of the sites)."""
    from safetensors.torch import load_file

    from lightning_peft import combine_adapter_dirs

    _, ours = both(tmp_path, MIXED)
    add_weighted_adapter(ours, NAMES, WEIGHTS, "mix", "ties_svd", density=0.5)
    save_adapter(ours, tmp_path / "saved")
    dirs = [tmp_path / "saved" / name for name in NAMES]
    combine_adapter_dirs(dirs, WEIGHTS, tmp_path / "files", "ties_svd", density=0.5)
    from_model = load_file(tmp_path / "saved" / "mix" / "adapter_model.safetensors")
    from_files = load_file(tmp_path / "files" / "adapter_model.safetensors")
    assert from_model.keys() == from_files.keys() and len(from_model) >= 12
    assert all(torch.equal(from_model[k], from_files[k]) for k in from_model)


def test_rslora_first_part_scale_one_where_peft_scales_by_sqrt_r(tmp_path):
    """peft's new adapter keeps the first part's ``use_rslora``: its scale is α/√r = √r, so its
    update is √r times the combination. Here the scale is 1: the update is the combination
    (``cat``: exactly Σ w_k ΔW_k), and peft's is √r times ours."""
    configs = [{**MIXED[0], "use_rslora": True}, MIXED[1], MIXED[2]]
    theirs, ours = both(tmp_path, configs)
    theirs.add_weighted_adapter(NAMES, WEIGHTS, "mix", "cat")
    add_weighted_adapter(ours, NAMES, WEIGHTS, "mix", "cat")
    for path, site in sites(ours):
        layer = layer_named(site, "mix")
        peft_layer = theirs.base_model.model.get_submodule(path)
        combination = sum(
            w * layer_named(site, k).delta_weight().double()
            for k, w in zip(NAMES, WEIGHTS, strict=True)
            if layer_named(site, k) is not None
        )
        rank = layer.r
        assert layer.scaling == 1.0 and peft_layer.scaling["mix"] == pytest.approx(rank**0.5)
        ours_delta = layer.delta_weight().double()
        torch.testing.assert_close(ours_delta, combination, rtol=0, atol=1e-5)
        theirs_delta = peft_layer.get_delta_weight("mix").detach().double()
        torch.testing.assert_close(theirs_delta, rank**0.5 * ours_delta, rtol=1e-5, atol=1e-5)


def test_ranks_that_differ_at_one_module_are_refused_where_peft_fails(tmp_path):
    """Equal ``r`` but a ``rank_pattern`` in one adapter only: peft's rank check passes and it
    fails half-way (stacking factors of two shapes) after adding the adapter; refused here by
    module, the model unchanged."""
    configs = [PATTERN[0], SAME[1], SAME[2]]
    theirs, ours = both(tmp_path, configs)
    with pytest.raises(RuntimeError):
        theirs.add_weighted_adapter(NAMES, WEIGHTS, "mix", "linear")
    assert "mix" in theirs.peft_config  # peft's half-made adapter
    before = snapshot(ours)
    with pytest.raises(ValueError, match=r"one rank per module; at 'model.layers.0.self_attn.v_"):
        add_weighted_adapter(ours, NAMES, WEIGHTS, "mix", "linear")
    assert_unchanged(ours, before)
    assert adapter_names(ours) == NAMES


def test_a_combined_adapter_in_a_mixed_batch_equals_peft(tmp_path):
    """The combined adapter is an adapter like the others: rows of it, of its parts and of the
    base in one batch (``mixed_batch``) give peft's ``adapter_names`` outputs."""
    from lightning_peft import mixed_batch

    theirs, ours = both(tmp_path, MIXED)
    theirs.add_weighted_adapter(NAMES, WEIGHTS, "mix", "svd")
    add_weighted_adapter(ours, NAMES, WEIGHTS, "mix", "svd")
    rows = ["mix", "fr", "__base__", "mix", "it"]
    ids = tokens(batch=len(rows), length=9)
    with torch.no_grad():
        expected = theirs.eval()(input_ids=ids, adapter_names=rows).logits
        with mixed_batch(ours, rows):
            got = logits(ours, ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
