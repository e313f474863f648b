"""``combine_adapter_dirs`` against peft 0.21.2: three adapters saved by peft, combined by peft
(``add_weighted_adapter``) and here from the files; the factors equal bit for bit, and the
combined adapter loaded here and by peft gives peft's outputs."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lightning_peft import load_adapter
from lightning_peft.peft_format.combine import combine_adapter_dirs
from tests.helpers.tiny_models import logits, tiny_llama, tokens

peft = pytest.importorskip("peft")

NAMES = ["fr", "de", "it"]
WEIGHTS = [0.6, -0.3, 1.1]
CONFIGS = {
    "same": [
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        {"r": 4, "lora_alpha": 2, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        {"r": 4, "lora_alpha": 16, "target_modules": ["v_proj", "o_proj"]},
    ],
    "mixed": [
        {"r": 2, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        {"r": 4, "lora_alpha": 3, "target_modules": ["q_proj", "k_proj", "v_proj"]},
        {"r": 6, "lora_alpha": 16, "target_modules": ["v_proj", "o_proj", "up_proj"]},
    ],
}


def peft_adapters(tmp_path, configs, **extra):
    """peft's model with fr, de, it (random A and B), saved under ``tmp_path/peft/<name>``."""
    torch.manual_seed(0)
    model = None
    for name, fields in zip(NAMES, configs, strict=True):
        config = peft.LoraConfig(init_lora_weights=False, **fields, **extra)
        if model is None:
            model = peft.get_peft_model(tiny_llama(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    model.save_pretrained(tmp_path / "peft", selected_adapters=NAMES)
    return model, [tmp_path / "peft" / name for name in NAMES]


@pytest.mark.parametrize(
    ("combination", "ranks", "options"),
    [
        ("linear", "same", {}),
        ("cat", "mixed", {}),
        ("svd", "mixed", {}),
        ("svd", "mixed", {"svd_rank": 3, "svd_clamp": 0.95}),
        ("ties", "same", {"density": 0.5}),
        ("magnitude_prune_svd", "mixed", {"density": 0.6}),
    ],
)
def test_combined_directory_equals_peft(tmp_path, combination, ranks, options):
    model, dirs = peft_adapters(tmp_path, CONFIGS[ranks])
    model.add_weighted_adapter(NAMES, WEIGHTS, "mix", combination_type=combination, **options)
    out = combine_adapter_dirs(dirs, WEIGHTS, tmp_path / "ours", combination, **options)
    ours = load_file(out / "adapter_model.safetensors")
    theirs = {n: m for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_A")}
    theirs = {n: m for n, m in theirs.items() if "mix" in m.lora_A}
    assert len(ours) == 2 * len(theirs) >= 8
    for name, layer in theirs.items():
        prefix = f"base_model.model.{name}"
        assert torch.equal(ours[f"{prefix}.lora_A.weight"], layer.lora_A["mix"].weight)
        assert torch.equal(ours[f"{prefix}.lora_B.weight"], layer.lora_B["mix"].weight)
    # The combined adapter active: peft's outputs, loaded here and loaded by peft.
    model.set_adapter("mix")
    ids = tokens()
    with torch.no_grad():
        expected = logits(model, ids)
        here = logits(load_adapter(tiny_llama(), out), ids)
        there = logits(peft.PeftModel.from_pretrained(tiny_llama(), out), ids)
    assert not torch.allclose(expected, logits(tiny_llama(), ids), atol=1e-3)
    torch.testing.assert_close(here, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(there, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("extra", "combination", "options", "message"),
    [
        (
            {"use_dora": True},
            "svd",
            {},
            "adapter '.*fr': it is DoRA: its magnitude vector has no weighted",
        ),
        ({"lora_bias": True}, "cat", {}, "has lora_bias: B's bias is not combined"),
        ({}, "linear", {}, r"needs adapters of one rank, got \{"),
        ({}, "ties", {}, r"'ties' needs density, the fraction of entries kept, in \[0, 1\]"),
        ({}, "dare_linear_svd", {"density": 0}, "density 0 gives 0/0"),
        ({}, "cat", {"density": 0.5}, "'cat' does not prune: leave it None"),
        ({}, "linear_svd", {}, "combination_type must be one of"),
        ({}, "cat", {"svd_rank": 2}, "svd_rank is for"),
        ({}, "svd", {"svd_clamp": 1.5}, r"svd_clamp is a quantile in \[0, 1\]"),
        ({}, "ties_svd", {"density": 0.5, "majority_sign_method": "mean"}, "majority_sign"),
    ],
)
def test_refused_before_anything_is_written(tmp_path, extra, combination, options, message):
    _, dirs = peft_adapters(tmp_path, CONFIGS["mixed"], **extra)
    before = {d: snapshot_dir(d) for d in dirs}
    with pytest.raises(ValueError, match=message):
        combine_adapter_dirs(dirs, WEIGHTS, tmp_path / "ours", combination, **options)
    assert not (tmp_path / "ours").exists()
    assert {d: snapshot_dir(d) for d in dirs} == before


def snapshot_dir(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_weights_must_match_the_adapters(tmp_path):
    _, dirs = peft_adapters(tmp_path, CONFIGS["same"])
    with pytest.raises(ValueError, match="one number per adapter: 3 adapters"):
        combine_adapter_dirs(dirs, [1.0, 2.0], tmp_path / "ours", "linear")
    with pytest.raises(ValueError, match="weights must be finite numbers, got nan"):
        combine_adapter_dirs(dirs, [1.0, float("nan"), 1.0], tmp_path / "ours", "linear")
    assert not (tmp_path / "ours").exists()
