"""The bottom layer on its own: name matching (peft's rules), the command-line values a method
declares, finite-value checks, strategy names, the adapter config protocol and hook handles."""

import pytest
import torch
from torch import nn

from lightning_peft.core.adapter import (
    AdapterConfigLike,
    ChildHook,
    keep_hook_handles,
    remove_hook_handles,
)
from lightning_peft.core.command_line import OptionValues, parse_names, shown_targets
from lightning_peft.core.config import ALL_LINEAR, check_target_names
from lightning_peft.core.distributed import clean_name
from lightning_peft.core.errors import InputError
from lightning_peft.core.finite import describe_non_finite, non_finite_tensors
from lightning_peft.core.matching import inside_modules_to_save, layer_index, name_matches


def test_name_matching_follows_peft():
    assert name_matches(["q_proj"], "model.layers.0.self_attn.q_proj")
    assert not name_matches(["proj"], "model.layers.0.self_attn.q_proj")  # a suffix is whole
    assert name_matches(r".*\.q_proj", "a.q_proj") and not name_matches(r"q_proj", "a.q_proj")
    assert not name_matches(None, "q_proj") and not name_matches([], "q_proj")
    assert inside_modules_to_save(["score"], "score.weight")
    assert inside_modules_to_save(["score"], "model.score")
    assert not inside_modules_to_save(["score"], "model.scores")
    assert layer_index("model.layers.3.self_attn.q_proj", None) == 3
    assert layer_index("h.12.attn", "h") == 12 and layer_index("lm_head", None) is None


def test_command_line_values():
    assert parse_names("q_proj, v_proj") == ["q_proj", "v_proj"]
    assert parse_names(ALL_LINEAR) == ALL_LINEAR
    assert parse_names(r"re:.*\.q_proj") == r".*\.q_proj"
    with pytest.raises(InputError, match=r"--targets: '\.\*q' is not a module name; .* re:\.\*q"):
        parse_names(".*q")
    with pytest.raises(InputError, match="--feedforward does not take all-linear"):
        parse_names(ALL_LINEAR, "--feedforward", allow_all_linear=False)
    with pytest.raises(InputError, match="has an empty module name"):
        parse_names("a,,b")
    assert shown_targets(["a", "b"]) == "a,b" and shown_targets(r"x\.y") == r"re:x\.y"
    values = OptionValues({"rank": 4}, {"rank": 16, "alpha": 32.0})
    assert values["rank"] == 4 and values["alpha"] == 32.0 and "alpha" not in values
    assert check_target_names("t", {"b", "a"}, False) == ["a", "b"]


def test_non_finite_tensors_are_counted_by_name():
    tensors = {
        "fine": torch.ones(3),
        "nan": torch.tensor([1.0, float("nan"), float("inf")]),
        "ints": torch.tensor([1, 2]),
    }
    found = non_finite_tensors(tensors)
    assert found == [("nan", 2, 3)]
    assert describe_non_finite(found, 3, "gradient") == (
        "the gradient of nan is not finite (2 of 3 values NaN or infinite)"
    )


def test_clean_name_drops_wrapper_segments():
    name = "model._fsdp_wrapped_module.layers.0._checkpoint_wrapped_module.q_proj.lora_A"
    assert clean_name(name) == "model.layers.0.q_proj.lora_A"


def test_every_method_config_is_an_adapter_config():
    from lightning_peft.methods.registry import METHODS

    for method in METHODS:
        assert isinstance(method.config_cls.__new__(method.config_cls), AdapterConfigLike)
    assert not isinstance(object(), AdapterConfigLike)


def _double(module, args, output):
    return output * 2


def test_child_hook_keeps_and_removes_its_handle():
    placement = ChildHook("child", _double)
    model = nn.Sequential(nn.Linear(2, 2))
    layer = nn.Identity()
    x = torch.ones(1, 2)
    plain = model(x)
    placement.attach(model, "0", layer)
    torch.testing.assert_close(model(x), plain * 2)
    placement.detach(model, "0.child", layer)
    torch.testing.assert_close(model(x), plain)
    assert not model[0]._forward_hooks and not hasattr(model[0], "child")
    # handles kept by hand work the same way
    keep_hook_handles(layer, model.register_forward_hook(_double))
    torch.testing.assert_close(model(x), plain * 2)
    remove_hook_handles(layer)
    torch.testing.assert_close(model(x), plain)
