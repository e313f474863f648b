"""One model, one LoRA config, both packages: outputs and gradients after a save/load in each
direction, and merging. Used by the conv, embedding, lora_bias and peft-table tests; and
``peft_adapted_names``, the modules a peft model adapted."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lightning_peft import (
    LoRAConfig,
    inject_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
    unload,
    unmerge_adapters,
)
from lightning_peft.methods.registry import adapter_layers
from lightning_peft.peft_format.files import peft_keys


@dataclass
class Interop:
    """Largest differences seen: outputs (absolute) and gradients (relative to each tensor's
    largest entry), per direction; merged outputs (absolute)."""

    outputs: dict[str, float] = field(default_factory=dict)
    grads: dict[str, float] = field(default_factory=dict)
    merged: float | None = None

    def __str__(self) -> str:
        parts = [f"{d}: out {self.outputs[d]:.1e}, grad {self.grads[d]:.1e}" for d in self.outputs]
        if self.merged is not None:
            parts.append(f"merged {self.merged:.1e}")
        return "; ".join(parts)


def peft_adapted_names(peft_model) -> list[str]:
    """The modules peft adapted, named as in the base model."""
    prefix = "base_model.model."
    return sorted(
        name[len(prefix) :]
        for name, m in peft_model.named_modules()
        if hasattr(m, "lora_A") and name.startswith(prefix) and len(m.lora_A)
    )


def their_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """peft's gradients keyed as in its saved file."""
    grads = {}
    for name, param in model.named_parameters():
        if param.grad is not None:
            key = name.replace(".default", "").replace(".modules_to_save", "")
            grads[key.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")] = param.grad
    return grads


def our_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our gradients keyed as in the saved file."""
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    keys = peft_keys(model, grads)
    return {keys[name]: grad for name, grad in grads.items()}


def _run(model: nn.Module, x: torch.Tensor, seed: int | None) -> torch.Tensor:
    if seed is not None:
        torch.manual_seed(seed)
    y = model(x)
    y.float().square().mean().backward()
    return y.detach()


def _compare(ours, theirs, x, seed, rtol, atol) -> tuple[float, float]:
    y_ours, y_theirs = _run(ours, x, seed), _run(theirs, x, seed)
    torch.testing.assert_close(y_ours, y_theirs, rtol=rtol, atol=atol)
    mine, peers = our_grads(ours), their_grads(theirs)
    assert mine.keys() == peers.keys(), (sorted(mine), sorted(peers))
    worst = 0.0
    for key, grad in mine.items():
        peer = peers[key]
        scale = peer.abs().max().clamp_min(1e-12)
        torch.testing.assert_close(grad, peer, rtol=rtol * 10, atol=atol * float(scale), msg=key)
        worst = max(worst, float((grad - peer).abs().max() / scale))
    return float((y_ours - y_theirs).abs().max()), worst


def check_against_peft(
    make_base,
    x: torch.Tensor,
    kwargs: dict,
    tmp_path: Path,
    *,
    train: bool = False,
    merge: bool = True,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> Interop:
    """``kwargs`` as ``peft.LoraConfig`` and ``LoRAConfig`` on ``make_base()``: peft's saved
    adapter loads here, ours loads in peft, with equal outputs and gradients (in ``train`` mode
    with the same seed before each forward, so that dropout masks agree); our merge keeps the
    outputs and unmerge restores the weights, and our ``unload(merge=True)`` equals peft's
    ``merge_and_unload`` (both refuse the same layers; ``merge=False`` skips this part).
    Returns the largest differences."""
    import peft

    base = make_base()
    seed = 1234 if train else None
    result = Interop()
    kwargs = {"init_lora_weights": False, **kwargs}

    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    for model in (ours, theirs):
        model.train(train)
    direction = "peft->ours"
    result.outputs[direction], result.grads[direction] = _compare(ours, theirs, x, seed, rtol, atol)

    ours = copy.deepcopy(base)
    inject_adapters(ours, LoRAConfig(**kwargs))
    save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(
        copy.deepcopy(base), tmp_path / "ours", is_trainable=True
    )
    for model in (ours, theirs):
        model.train(train)
    direction = "ours->peft"
    result.outputs[direction], result.grads[direction] = _compare(ours, theirs, x, seed, rtol, atol)

    if not merge:
        return result
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        y = ours(x)
        refusals = [layer.merge_refusal() for _, layer in adapter_layers(ours)]
        if any(refusals):
            try:
                theirs.merge_and_unload()
            except (NotImplementedError, RuntimeError, ValueError):
                pass
            else:
                raise AssertionError(f"peft merged what this package refuses: {refusals}")
            return result
        weights = {k: v.clone() for k, v in ours.state_dict().items()}
        merge_adapters(ours)
        torch.testing.assert_close(ours(x), y, rtol=rtol, atol=atol)
        unmerge_adapters(ours)
        for key, value in ours.state_dict().items():
            torch.testing.assert_close(value, weights[key], rtol=1e-5, atol=1e-6, msg=key)
        merged_ours = unload(copy.deepcopy(ours), merge=True)
        merged_theirs = theirs.merge_and_unload()
        y_merged = merged_ours(x)
        torch.testing.assert_close(y_merged, merged_theirs(x), rtol=rtol, atol=atol)
        result.merged = float((y_merged - y).abs().max())
    return result
