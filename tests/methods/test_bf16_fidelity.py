"""bfloat16 base, float32 adapters: our outputs and gradients are as close to float64 as peft's.

On the small transformers models of ``tiny_models`` (Llama, GPT-2, BERT), and on single
``nn.Conv1d`` / ``Conv2d`` / ``Conv3d`` layers, the same adapter values go into lightning-peft and
peft on a bfloat16 copy of the model (adapters kept in float32, as both do by default), and into
peft on a float64 copy (the reference). For every adapted layer and every adapter tensor (A, B,
B's bias, DoRA's magnitude) the gradient's error against the reference is measured, and for the
convolutions also the output's; ours must stay within 2x of peft's, whose adapter branch runs in
float32 and is rounded to bfloat16 once.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lightning_peft import LoRAConfig, inject_adapters, save_adapter, trainable_parameters
from tests.helpers.reference import max_rel_error
from tests.helpers.tiny_models import MODELS, TARGETS

peft = pytest.importorskip("peft")
from peft.tuners.tuners_utils import cast_adapter_dtype  # noqa: E402


def _kind(name: str) -> str:
    """ "A", "B" or "m" (DoRA's magnitude) for an adapter parameter's name, ours or peft's."""
    if "lora_bias" in name or ("lora_B" in name and name.endswith(".bias")):
        return "b_B"
    for marker, kind in (("lora_A", "A"), ("lora_B", "B"), ("magnitude", "m")):
        if marker in name:
            return kind
    raise ValueError(f"not an adapter parameter: {name}")


def _peft_copy(base, targets, options, adapter_dir, dtype):
    """peft on a copy of ``base`` in ``dtype``, with the adapter saved in ``adapter_dir``."""
    model = copy.deepcopy(base).to(dtype)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, **options)
    model = peft.inject_adapter_in_model(config, model)
    cast_adapter_dtype(model, adapter_name="default")  # float32 adapters, as get_peft_model does
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    tensors = {k.removeprefix("base_model.model."): v for k, v in tensors.items()}
    peft.set_peft_model_state_dict(model, tensors)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return model


def _layer_grads(layer, x, grad_y) -> dict[str, torch.Tensor]:
    """The output ("y") and the gradients of the adapter tensors ("A", "B", "b_B", "m") and of
    x, one layer on its own."""
    x = x.detach().requires_grad_()
    y = layer(x)
    y.backward(grad_y.to(y.dtype))
    grads = {
        _kind(name): p.grad.double() for name, p in layer.named_parameters() if p.grad is not None
    }
    return grads | {"x": x.grad.double(), "y": y.detach().double()}


def _rms_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ (RMS over all entries; want is float64)."""
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("family", sorted(MODELS))
def test_bf16_layer_gradient_error_within_2x_of_peft(family, use_dora, tmp_path):
    """Every adapted layer alone, on bfloat16 x, W, b and grad_y and float32 adapters; the
    reference is float64 on exactly those values, so the errors are the layers' own arithmetic."""
    base = MODELS[family](seed=3)
    ours = copy.deepcopy(base)
    torch.manual_seed(4)
    config = LoRAConfig(
        r=4,
        lora_alpha=8,
        target_modules=TARGETS[family],
        use_dora=use_dora,
        init_lora_weights=False,  # B non-zero: the adapters do real work
        backend="torch",
    )
    report = inject_adapters(ours, config)
    save_adapter(ours, tmp_path)
    ours = ours.to(torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in trainable_parameters(ours).values())
    options = {"use_dora": use_dora}
    models = {
        "ours": ours,
        "peft": _peft_copy(base, TARGETS[family], options, tmp_path, torch.bfloat16),
        # the reference sees exactly the bfloat16 base weights, in float64
        "reference": _peft_copy(
            base.to(torch.bfloat16), TARGETS[family], options, tmp_path, torch.float64
        ),
    }
    generator = torch.Generator().manual_seed(5)
    worst = {}  # (impl, tensor) -> max error over the layers
    for adapted in report.modules:
        layers = {impl: model.get_submodule(adapted.name) for impl, model in models.items()}
        in_features, out_features = (int(n) for n in adapted.shape.split("->"))
        x = torch.randn(2, 9, in_features, generator=generator).bfloat16()
        grad_y = torch.randn(2, 9, out_features, generator=generator).bfloat16()
        want = _layer_grads(layers["reference"], x.double(), grad_y.double())
        for impl in ("ours", "peft"):
            got = _layer_grads(layers[impl], x, grad_y)
            assert set(got) == set(want)
            for name in set(want) - {"y"}:
                error = max_rel_error(got[name], want[name])
                worst[impl, name] = max(worst.get((impl, name), 0.0), error)
    for name in sorted({name for _, name in worst}):
        assert worst["peft", name] > 0  # bfloat16 rounding somewhere: a meaningful comparison
        assert worst["ours", name] <= 2 * worst["peft", name], (name, worst)


# -- convolutions -------------------------------------------------------------------------------


class _OneConv(nn.Module):
    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x)


CONVS = {  # name -> (conv factory, input shape)
    "conv1d": (lambda: nn.Conv1d(8, 12, 3, padding=1), (2, 8, 20)),
    "conv2d": (lambda: nn.Conv2d(8, 12, 3, padding=1), (2, 8, 9, 9)),
    "conv2d-groups2": (lambda: nn.Conv2d(8, 12, 3, padding=1, groups=2), (2, 8, 9, 9)),
    "conv3d": (lambda: nn.Conv3d(8, 12, 3, padding=1), (2, 8, 5, 6, 5)),
}
CONV_VARIANTS = {  # DoRA with lora_bias is refused by both packages
    "lora": {},
    "lora-bias": {"lora_bias": True},
    "dora": {"use_dora": True},
}


@pytest.mark.parametrize("variant", list(CONV_VARIANTS))
@pytest.mark.parametrize("conv", list(CONVS))
def test_bf16_conv_error_within_2x_of_peft(conv, variant, tmp_path):
    """A convolution on bfloat16 x, W, b and grad_y with float32 adapters: the output's RMS error
    and every gradient's error against float64 on exactly those values, over a few inputs, at
    most 2x peft's (which adds its float32 branch to the bfloat16 base output and rounds once)."""
    make_conv, shape = CONVS[conv]
    options = CONV_VARIANTS[variant]
    torch.manual_seed(0)
    base = _OneConv(make_conv())
    ours = copy.deepcopy(base)
    torch.manual_seed(4)
    config = LoRAConfig(
        r=4, lora_alpha=8, target_modules=["conv"], init_lora_weights=False, **options
    )
    inject_adapters(ours, config)
    save_adapter(ours, tmp_path)
    ours = ours.to(torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in trainable_parameters(ours).values())
    models = {
        "ours": ours,
        "peft": _peft_copy(base, ["conv"], options, tmp_path, torch.bfloat16),
        "reference": _peft_copy(
            base.to(torch.bfloat16), ["conv"], options, tmp_path, torch.float64
        ),
    }
    generator = torch.Generator().manual_seed(5)
    worst = {}  # (impl, tensor) -> max error over the inputs
    for _ in range(3):
        x = torch.randn(*shape, generator=generator).bfloat16()
        grad_y = torch.randn_like(models["ours"](x), dtype=torch.float32).bfloat16()
        for model in models.values():
            model.zero_grad(set_to_none=True)
        want = _layer_grads(models["reference"], x.double(), grad_y.double())
        for impl in ("ours", "peft"):
            got = _layer_grads(models[impl], x, grad_y)
            assert set(got) == set(want)
            for name in want:
                error = _rms_error(got[name], want[name])
                worst[impl, name] = max(worst.get((impl, name), 0.0), error)
    print(f"\n{conv} {variant}: " + ", ".join(
        f"{name} {worst['ours', name]:.2e}/{worst['peft', name]:.2e}" for name in sorted(want)
    ))  # fmt: skip
    assert worst["peft", "y"] > 0  # bfloat16 rounding: a meaningful comparison
    for name in want:
        # B's bias: its gradient s·Σ grad_y is exact in float32 for both (0 error)
        assert worst["ours", name] <= 2 * worst["peft", name], (name, worst)
