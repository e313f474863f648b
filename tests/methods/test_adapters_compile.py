"""Adapted models under ``torch.compile``: no graph break from our layers (LoRA and DoRA), and
DoRA's cached ``‖W‖²`` follows the weight where this package changes it."""

import copy

import pytest
import torch
from torch import nn

from lightning_peft import LoRAConfig, LoRALinear, inject_adapters, merge_adapters, unmerge_adapters
from tests.helpers.tiny_models import MODELS, tokens


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_all_linear_llama_compiles_without_graph_breaks(use_dora):
    model = MODELS["llama"]()
    config = LoRAConfig(
        r=4,
        target_modules="all-linear",
        use_dora=use_dora,
        init_lora_weights=False,
        backend="torch",
    )
    inject_adapters(model, config)
    model.train()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(input_ids=tokens())
    reasons = [str(b.reason).splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1


class TwoDoRALayers(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first = LoRALinear(
            nn.Linear(10, 7), r=3, lora_alpha=6, use_dora=True, init_lora_weights=False
        )
        self.second = LoRALinear(
            nn.Linear(7, 5, bias=False), r=2, lora_alpha=2, use_dora=True, init_lora_weights=False
        )

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


def test_compiled_dora_follows_weight_changes_made_through_the_package():
    torch._dynamo.reset()
    model = TwoDoRALayers().eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 4, 10, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(compiled(x), model(x))

    # a new base weight, loaded in place: the load hook refreshes ‖W‖²
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["first.weight"] = state["first.weight"] * 1.5 + 0.1
    model.load_state_dict(state)
    fresh = copy.deepcopy(model)
    fresh.first.variant.weight_changed(fresh.first)  # eager, from scratch
    fresh.second.variant.weight_changed(fresh.second)
    torch.testing.assert_close(compiled(x), fresh(x))

    # merge and unmerge rewrite W in place and refresh it too
    expected = model(x)
    merge_adapters(model)
    torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-6)
    unmerge_adapters(model)
    torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-6)


def test_eager_dora_notices_weight_changed_in_place_by_other_code():
    model = TwoDoRALayers().eval()
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model.first.weight.mul_(1.5)  # no hook runs: the version counter tells
    fresh = copy.deepcopy(model)
    fresh.first.variant.weight_changed(fresh.first)
    torch.testing.assert_close(model(x), fresh(x))


def test_dora_cache_stays_float32_under_half():
    layer = LoRALinear(nn.Linear(6, 4), r=2, lora_alpha=2, use_dora=True)
    layer.half()
    assert layer.weight.dtype == torch.float16
    assert layer.weight_sq_norm.dtype == torch.float32 == layer.lora_magnitude.dtype
