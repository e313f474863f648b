"""``lightning-peft inspect``: singular values of ΔW = s·B·A from the r×r core, against dense
float64 SVDs and against peft's own ΔW, for adapters written here and by peft."""

import json

import pytest
import torch

from lightning_peft import LoRAConfig, inject_adapters, save_adapter
from lightning_peft.cli.app import main
from lightning_peft.peft_format.spectrum import (
    dora_delta_norm,
    energy_rank,
    inspect_adapter,
    lower_rank_hint,
    update_singular_values,
)
from tests.helpers.tiny_models import tiny_llama

peft = pytest.importorskip("peft")


def dense_svdvals(lora_A, lora_B, scaling):
    return torch.linalg.svdvals(scaling * lora_B.double() @ lora_A.double())


@pytest.mark.parametrize(
    ("out_features", "in_features", "rank"), [(37, 23, 5), (3, 29, 5), (40, 2, 3), (17, 19, 1)]
)
def test_core_singular_values_equal_the_dense_svd(out_features, in_features, rank):
    gen = torch.Generator().manual_seed(out_features)
    lora_A = torch.randn(rank, in_features, generator=gen)
    lora_B = torch.randn(out_features, rank, generator=gen)
    got = update_singular_values(lora_A, lora_B, 0.7)
    expected = dense_svdvals(lora_A, lora_B, 0.7)  # min(out, in) values, all but k ~ 0
    k = min(rank, out_features, in_features)
    assert got.shape == (rank,) and got.dtype == torch.float64
    torch.testing.assert_close(got[:k], expected[:k], rtol=1e-10, atol=1e-12)
    assert not got[k:].any()  # the rank above min(out, in): zeros
    assert float(expected[k:].abs().sum()) < 1e-12 * float(expected[0])
    with pytest.raises(ValueError, match="do not fit"):
        update_singular_values(lora_A, lora_B.T, 1.0)


def test_energy_rank():
    assert energy_rank(torch.tensor([3.0, 1.0, 0.0]), 0.9) == 1  # 9/10 of the energy
    assert energy_rank(torch.tensor([3.0, 1.0, 0.0]), 0.95) == 2
    assert energy_rank(torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.9) == 4
    assert energy_rank(torch.zeros(4), 0.9) == 0


def test_dora_delta_norm_equals_the_dense_difference():
    gen = torch.Generator().manual_seed(0)
    weight, lora_A = torch.randn(31, 17, generator=gen), torch.randn(4, 17, generator=gen)
    lora_B, magnitude = torch.randn(31, 4, generator=gen), torch.rand(31, generator=gen) + 0.5
    merged = weight.double() + 0.3 * lora_B.double() @ lora_A.double()
    merged = merged * (magnitude.double() / merged.norm(dim=1))[:, None]
    expected = float((merged - weight.double()).norm())
    assert dora_delta_norm(weight, lora_A, lora_B, magnitude, 0.3) == pytest.approx(expected, 1e-10)


def tiny_base(tmp_path):
    """A tiny Llama saved as a transformers directory (the base for ‖ΔW‖/‖W‖)."""
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    return tmp_path / "base", lambda: AutoModelForCausalLM.from_pretrained(tmp_path / "base")


def randomise_B(model, low_rank: bool = False):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B") or name.endswith("lora_B.default.weight"):
                if low_rank:  # B = u vᵀ: every ΔW has rank 1
                    u, v = torch.randn(param.shape[0], 1, generator=gen), torch.randn(1, 4)
                    param.copy_(u @ v)
                else:
                    param.copy_(torch.randn(param.shape, generator=gen))


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_inspects_an_adapter_written_here(tmp_path, use_dora):
    base_dir, load_base = tiny_base(tmp_path)
    model = load_base()
    config = LoRAConfig(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        use_dora=use_dora,
        rank_pattern={"o_proj": 2},
    )
    inject_adapters(model, config)
    randomise_B(model)
    save_adapter(model, tmp_path / "adapter")
    _, spectra = inspect_adapter(tmp_path / "adapter", base_dir)
    base = load_base().state_dict()
    assert len(spectra) == 14
    for spectrum in spectra:
        layer = model.get_submodule(spectrum.name)
        assert spectrum.rank == layer.r == (2 if spectrum.name.endswith("o_proj") else 4)
        assert spectrum.scaling == layer.scaling
        lora_A, lora_B = layer.lora_A.detach(), layer.lora_B.detach()
        expected = dense_svdvals(lora_A, lora_B, layer.scaling)[: layer.r]
        torch.testing.assert_close(spectrum.singular_values, expected, rtol=1e-9, atol=1e-12)
        weight = base[f"{spectrum.name}.weight"].double()
        delta = layer.scaling * lora_B.double() @ lora_A.double()
        if use_dora:
            norm = (weight + delta).norm(dim=1)
            merged = (weight + delta) * (layer.lora_magnitude.detach().double() / norm)[:, None]
            delta = merged - weight
        assert spectrum.relative_norm == pytest.approx(float(delta.norm() / weight.norm()), 1e-9)


@pytest.mark.parametrize(
    "options",
    [{}, {"use_rslora": True}, {"use_dora": True}, {"rank_pattern": {"v_proj": 2}}],
    ids=["lora", "rslora", "dora", "rank_pattern"],
)
def test_inspects_an_adapter_written_by_peft(tmp_path, options):
    """The reference is peft's own ΔW (``get_delta_weight``) and, for DoRA, the difference of
    peft's merged weights."""
    base_dir, load_base = tiny_base(tmp_path)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **options)
    model = peft.get_peft_model(load_base(), config)
    randomise_B(model)
    model.save_pretrained(tmp_path / "peft")
    _, spectra = inspect_adapter(tmp_path / "peft", base_dir)
    assert [s.name for s in spectra] == sorted(
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")
    )
    layers = {s.name: model.base_model.model.get_submodule(s.name) for s in spectra}
    merged = model.merge_and_unload().state_dict() if options.get("use_dora") else None
    base = load_base().state_dict()
    for spectrum in spectra:
        weight = base[f"{spectrum.name}.weight"].double()
        if merged is None:
            delta = layers[spectrum.name].get_delta_weight("default").double()
            expected = torch.linalg.svdvals(delta)[: spectrum.rank]
            torch.testing.assert_close(spectrum.singular_values, expected, rtol=1e-5, atol=1e-6)
        else:
            delta = merged[f"{spectrum.name}.weight"].double() - weight
        assert spectrum.relative_norm == pytest.approx(float(delta.norm() / weight.norm()), 1e-5)


def test_hint_only_when_a_lower_rank_holds_the_update(tmp_path):
    _, load_base = tiny_base(tmp_path)
    for low_rank, name in ((True, "low"), (False, "full")):
        model = load_base()
        inject_adapters(model, LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        randomise_B(model, low_rank=low_rank)
        save_adapter(model, tmp_path / name)
    _, low = inspect_adapter(tmp_path / "low")
    assert all(s.effective_rank() == 1 and s.relative_norm is None for s in low)
    assert lower_rank_hint(low) == (
        "hint: every module's update holds 99% of its energy in at most 1 of its 4 directions: "
        "--rank 1 would likely have done as well"
    )
    _, full = inspect_adapter(tmp_path / "full")
    assert lower_rank_hint(full) is None


def test_inspect_command(tmp_path, capsys):
    base_dir, load_base = tiny_base(tmp_path)
    model = load_base()  # name_or_path is base_dir: the adapter names its base
    inject_adapters(model, LoRAConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomise_B(model)
    save_adapter(model, tmp_path / "adapter")
    main(["inspect", str(tmp_path / "adapter"), "--json", str(tmp_path / "figures.json")])
    out = capsys.readouterr().out
    assert f"adapter {tmp_path / 'adapter'}: LoRA, 14 modules, rank 4; base: {base_dir}" in out
    assert "model.layers.1.mlp.down_proj" in out and "‖ΔW‖/‖W‖: median" in out
    assert (tmp_path / "adapter-spectra.png").stat().st_size > 5000
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert len(figures) == 14 and len(figures[0]["singular_values"]) == 4


def write_bottleneck(tmp_path):
    from lightning_peft import AdapterConfig

    _, load_base = tiny_base(tmp_path)
    model = load_base()
    inject_adapters(model, AdapterConfig(bottleneck_dim=4, target_modules=["mlp"]))
    return save_adapter(model, tmp_path / "bottleneck")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/nonexistent"], "adapter directory /nonexistent does not exist"),
        (["BOTTLENECK"], "holds a AdapterConfig adapter; inspect reads LoRA and DoRA"),
        (["ADAPTER", "--model", "/nonexistent"], "model directory /nonexistent does not exist"),
        (["ADAPTER", "--model", "OTHER"], "is --model the adapter's base model?"),
        ([], "the following arguments are required: adapter_dir"),
        (["NO_WEIGHTS"], "has no adapter_model.safetensors or adapter_model.bin (it holds "
         "adapter_config.json)"),
        (["NOT_TENSORS"], "adapter_model.bin: 'x' is of type int, not a tensor"),
    ],
)  # fmt: skip
def test_inspect_bad_input_is_one_line(tmp_path, capsys, args, message):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, load_base = tiny_base(tmp_path)
    model = load_base()
    inject_adapters(model, LoRAConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "adapter")
    other = LlamaForCausalLM(
        LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    )  # fmt: skip
    other.save_pretrained(tmp_path / "other")
    for name, bin_content in (("no_weights", None), ("not_tensors", {"x": 3})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_bytes(
            (tmp_path / "adapter" / "adapter_config.json").read_bytes()
        )
        if bin_content is not None:
            torch.save(bin_content, tmp_path / name / "adapter_model.bin")
    substitutes = {
        "NO_WEIGHTS": str(tmp_path / "no_weights"),
        "NOT_TENSORS": str(tmp_path / "not_tensors"),
        "BOTTLENECK": str(write_bottleneck(tmp_path)),
        "ADAPTER": str(tmp_path / "adapter"),
        "OTHER": str(tmp_path / "other"),
    }
    capsys.readouterr()  # the set-up's progress bars
    with pytest.raises(SystemExit) as exit_:
        main(["inspect", *[substitutes.get(a, a) for a in args]])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lightning-peft: error: ")
    assert message in lines[0]


class EmbedConvLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(20, 8)
        self.conv = torch.nn.Conv2d(3, 6, 3)
        self.lin = torch.nn.Linear(8, 5)


def test_inspects_peft_embedding_and_convolution_adapters(tmp_path):
    """ΔW of an embedding (V, d) and of a convolution (out, in·k·k): the spectra and ‖ΔW‖/‖W‖ of
    peft's own delta weights."""
    from safetensors.torch import save_file

    base = EmbedConvLinear()
    (tmp_path / "base").mkdir()
    tensors = {k: v.contiguous() for k, v in base.state_dict().items()}
    save_file(tensors, tmp_path / "base" / "model.safetensors")
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["emb", "conv", "lin"])
    model = peft.get_peft_model(EmbedConvLinear(), config)
    randomise_B(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_embedding_B" in name:
                param.normal_()
    model.save_pretrained(tmp_path / "peft")
    _, spectra = inspect_adapter(tmp_path / "peft", tmp_path / "base")
    assert [s.name for s in spectra] == ["conv", "emb", "lin"]
    for spectrum in spectra:
        layer = model.base_model.model.get_submodule(spectrum.name)
        delta = layer.get_delta_weight("default").detach().double()
        weight = base.get_submodule(spectrum.name).weight.detach().double()
        expected = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1))[:3]
        torch.testing.assert_close(spectrum.singular_values, expected, rtol=1e-5, atol=1e-7)
        assert spectrum.relative_norm == pytest.approx(float(delta.norm() / weight.norm()), 1e-5)


def test_inspect_compare_shows_a_combined_adapter_beside_its_parts(tmp_path, capsys):
    """peft's ``cat`` of two adapters (ranks 2 and 3, other targets) saved in peft's layout:
    ``--compare`` prints each module's rank90/r and ‖ΔW‖_F for the combined adapter and the
    parts, against dense float64 SVDs of peft's own ΔW; the JSON carries the parts' values."""
    _, load_base = tiny_base(tmp_path)
    torch.manual_seed(0)
    model = peft.get_peft_model(
        load_base(),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False),
        adapter_name="fr",
    )
    model.add_adapter(
        "de",
        peft.LoraConfig(r=3, lora_alpha=3, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False),
    )  # fmt: skip
    model.add_weighted_adapter(["fr", "de"], [1.0, -0.5], "mix", combination_type="cat")
    model.save_pretrained(tmp_path / "peft", selected_adapters=["fr", "de", "mix"])
    dirs = [tmp_path / "peft" / name for name in ("mix", "fr", "de")]
    args = ["inspect", str(dirs[0]), "--compare", str(dirs[1]), str(dirs[2])]
    main([*args, "--json", str(tmp_path / "figures.json")])
    out = capsys.readouterr().out
    assert "combined mix beside its parts fr, de: rank90/r and ‖ΔW‖_F per module" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()}
    layers = {n: m for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_A")}
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):
        cells = rows[name]  # mix: rank90/r norm, fr: ..., de: ...
        for i, adapter in enumerate(("mix", "fr", "de")):
            if adapter not in layers[name].lora_A:
                assert cells[2 * i] == "-"
                cells.insert(2 * i + 1, "-")
                continue
            delta = layers[name].get_delta_weight(adapter).detach().double()
            values = torch.linalg.svdvals(delta)
            rank = layers[name].r[adapter]
            assert cells[2 * i] == f"{energy_rank(values[:rank], 0.9)}/{rank}"
            assert float(cells[2 * i + 1]) == pytest.approx(float(delta.norm()), rel=1e-2)
    assert rows["model.layers.0.self_attn.q_proj"][0].endswith("/5")  # cat: 2 + 3
    assert (tmp_path / "peft" / "mix-compare.png").stat().st_size > 5000
    figures = {f["module"]: f for f in json.loads((tmp_path / "figures.json").read_text())}
    v_proj = figures["model.layers.0.self_attn.v_proj"]
    assert set(v_proj["parts"]) == {"de"} and len(v_proj["parts"]["de"]) == 3
    # cat is the weighted sum: the combined ΔW's singular values are those of w_fr ΔW_fr + ...
    q = layers["model.layers.0.self_attn.q_proj"]
    expected = torch.linalg.svdvals(
        q.get_delta_weight("fr").detach().double()
        - 0.5 * q.get_delta_weight("de").detach().double()
    )[:5]
    got = torch.tensor(figures["model.layers.0.self_attn.q_proj"]["singular_values"])
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
