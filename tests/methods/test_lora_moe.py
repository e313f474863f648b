"""LoRA on transformers' mixture-of-experts models (``target_parameters``, ``LoRAExperts``,
``LoRAParameter``) against peft 0.21.2: selection, trainable counts, outputs and gradients after
a save/load in each direction, each experts implementation, merge, and the refusals."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_peft import (
    LoRAConfig,
    inject_adapters,
    load_adapter,
    save_adapter,
)
from tests.helpers.peft_interop import our_grads, their_grads
from tests.helpers.tiny_models import MOE_MODELS, tokens

peft = pytest.importorskip("peft")

IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")


def _logits_and_grads(model, ids, grads_of):
    model.zero_grad(set_to_none=True)
    embeddings = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeddings).logits
    logits.square().mean().backward()
    return logits.detach(), grads_of(model), embeddings.grad


def _assert_same(ours, theirs, ids, rtol=1e-5, atol=1e-5) -> tuple[float, float]:
    """Outputs, adapter gradients (by PEFT key) and the input gradient agree; returns the largest
    output difference and the largest gradient difference relative to each tensor's maximum."""
    y_ours, g_ours, dx_ours = _logits_and_grads(ours, ids, our_grads)
    y_theirs, g_theirs, dx_theirs = _logits_and_grads(theirs, ids, their_grads)
    torch.testing.assert_close(y_ours, y_theirs, rtol=rtol, atol=atol)
    assert g_ours.keys() == g_theirs.keys(), sorted(set(g_ours) ^ set(g_theirs))
    worst = 0.0
    for key, grad in [*g_ours.items(), ("input", dx_ours)]:
        peer = g_theirs.get(key, dx_theirs)
        scale = peer.abs().max().clamp_min(1e-12)
        torch.testing.assert_close(grad, peer, rtol=rtol * 10, atol=atol * float(scale), msg=key)
        worst = max(worst, float((grad - peer).abs().max() / scale))
    return float((y_ours - y_theirs).abs().max()), worst


def _set_implementation(model, implementation: str) -> None:
    model.config._experts_implementation = implementation
    for module in model.modules():
        if hasattr(module, "config") and hasattr(module.config, "_experts_implementation"):
            module.config._experts_implementation = implementation


KWARGS = {"r": 3, "lora_alpha": 5, "target_modules": "all-linear", "init_lora_weights": False}


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_all_linear_selects_what_peft_selects(family):
    """peft rewrites all-linear on these models into the attention linears plus
    target_parameters gate_up_proj (rank 2r), down_proj and gate.weight."""
    base = MOE_MODELS[family]()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**KWARGS))
    ours = copy.deepcopy(base)
    report = inject_adapters(ours, LoRAConfig(**KWARGS))
    peft_trainable = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert report.trainable_params == peft_trainable
    ours_keys = {k: tuple(v.shape) for k, v in _saved(ours).items()}
    theirs_keys = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(theirs).items()}
    assert ours_keys == theirs_keys
    kinds = {m.kind for m in report.modules}
    assert kinds == {"LoRA", "LoRA (experts)", "LoRA (parameter)"}
    experts = next(m for m in report.modules if m.kind == "LoRA (experts)")
    assert "4 experts" in experts.shape and "r=6" in experts.shape  # gate_up_proj at 2r


def _saved(model):
    from lightning_peft.model.helpers import adapter_state_dict
    from lightning_peft.peft_format.files import peft_keys

    live = adapter_state_dict(model)
    names = peft_keys(model, live)
    return {names[k]: v for k, v in live.items()}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_matches_peft_both_ways(family, implementation, tmp_path):
    """peft's adapter loads here and ours in peft: equal logits, adapter and input gradients,
    for each experts implementation transformers offers."""
    kwargs = dict(KWARGS)
    if family == "gpt_oss":  # peft leaves gpt-oss alone: name the parameters
        kwargs["target_parameters"] = ["gate_up_proj", "down_proj", "router.weight"]
    base = MOE_MODELS[family]()
    _set_implementation(base, implementation)
    ids = tokens(batch=3, length=5)

    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    out, grad = _assert_same(ours, theirs, ids)
    print(f"\n{family} {implementation} peft->ours: out {out:.1e}, grad {grad:.1e}")

    ours = copy.deepcopy(base)
    inject_adapters(ours, LoRAConfig(**kwargs))
    save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(
        copy.deepcopy(base), tmp_path / "ours", is_trainable=True
    )
    out, grad = _assert_same(ours, theirs, ids)
    print(f"{family} {implementation} ours->peft: out {out:.1e}, grad {grad:.1e}")
