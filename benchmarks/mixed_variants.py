"""The mixed-adapter benchmark's contestants: k LoRA adapters on one frozen base, ours and peft's.

Every model here is a weight-sharing copy of one loaded base (``shared_copy``: the frozen
weights exist once). The adapters are written once to a scratch folder in the PEFT format
(random A, B scaled to 0.05, so they do real and distinct work) and loaded from there by both
libraries, so ours and peft hold the same values:

- ``ours single``: ``load_adapter`` of adapter ``a0`` alone, the plain one-adapter model;
- ``ours mixed``: every adapter loaded by name (``load_adapter(..., name=)``), all active (so all
  train); a batch runs inside ``mixed_batch(model, adapter_names=rows)``, one name per row;
- ``peft``: a ``PeftModel`` holding every adapter (``from_pretrained`` + ``load_adapter``); single
  is its forward with ``a0`` active, mixed is ``model(..., adapter_names=rows)``.

Rows are spread evenly over the ``k`` adapters in round-robin order (row ``i`` uses adapter
``i mod k``): an unsorted batch, as requests arrive at a server.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn

from benchmarks.model_variants import shared_copy

ADAPTER_COUNTS = (1, 4, 16)
B_SCALE = 0.05  # B at a small scale, as after some training
LEARNING_RATE = 1e-5  # small: the timed steps barely move the adapters


def adapter_names(count: int) -> list[str]:
    """``a0 .. a{count-1}``: the adapters' names (valid keys and directory names)."""
    return [f"a{i}" for i in range(count)]


def row_names(rows: int, count: int) -> list[str]:
    """One adapter name per row, rows spread evenly over ``count`` adapters (round robin)."""
    if rows < count:
        raise ValueError(f"{count} adapters need at least {count} rows to each get one, not {rows}")
    return [f"a{i % count}" for i in range(rows)]


def write_adapters(
    base: nn.Module, count: int, rank: int, alpha: float, root: Path
) -> tuple[dict[str, Path], int]:
    """``count`` LoRA adapters (all linear layers but the output layer) in the PEFT format under
    ``root/<name>``, each from its own seed; returns ({name: directory}, adapted layers)."""
    from lightning_peft import LoRAConfig, inject_adapters, save_adapter

    config = LoRAConfig(
        r=rank, lora_alpha=alpha, target_modules="all-linear", init_lora_weights=False
    )
    directories, adapted = {}, 0
    for index, name in enumerate(adapter_names(count)):
        model = shared_copy(base)
        torch.manual_seed(1 + index)
        adapted = len(inject_adapters(model, config).modules)
        with torch.no_grad():
            for key, parameter in model.named_parameters():
                if "lora_B" in key:
                    parameter.mul_(B_SCALE)
        directories[name] = save_adapter(model, root / name)
    return directories, adapted


def build_ours_single(base: nn.Module, directory: Path) -> nn.Module:
    """lightning-peft with the one adapter in ``directory`` (unnamed): the baseline."""
    from lightning_peft import load_adapter

    return load_adapter(shared_copy(base), directory)


def build_ours_named(base: nn.Module, directories: dict[str, Path]) -> nn.Module:
    """lightning-peft with every adapter of ``directories`` loaded under its name, all of them
    active, so all are trainable (inside ``mixed_batch`` each row runs its own adapter only)."""
    from lightning_peft import load_adapter, set_active_adapters

    model = shared_copy(base)
    for name, directory in directories.items():
        load_adapter(model, directory, name=name)
    set_active_adapters(model, list(directories))
    return model


def ours_mixed(model: nn.Module, rows: Sequence[str] | None) -> AbstractContextManager:
    """The context a mixed batch runs in (``rows`` None: the model's own adapters, no mixing)."""
    if rows is None:
        return nullcontext()
    from lightning_peft import mixed_batch

    return mixed_batch(model, adapter_names=list(rows))


def build_peft(base: nn.Module, directories: dict[str, Path]) -> nn.Module:
    """peft's ``PeftModel`` holding every adapter of ``directories``, the first one active."""
    import peft

    names = list(directories)
    model = peft.PeftModel.from_pretrained(
        shared_copy(base), directories[names[0]], adapter_name=names[0]
    )
    for name in names[1:]:
        model.load_adapter(directories[name], adapter_name=name)
    model.set_adapter(names[0])
    model.eval()
    return model


def peft_training_refusal(model: nn.Module, ids: Tensor, rows: Sequence[str]) -> str:
    """What peft says when asked for a training forward over a mixed batch (it refuses)."""
    model.train()
    try:
        model(input_ids=ids[:1], adapter_names=list(rows[:1]))
    except (ValueError, RuntimeError, TypeError) as error:
        return str(error)
    finally:
        model.eval()
    raise RuntimeError("peft ran a mixed-adapter batch in training mode: update the benchmark")


# -- the timed calls ----------------------------------------------------------------------------


def forward_call(
    model: nn.Module, ids: Tensor, context: Callable[[], AbstractContextManager], **kwargs
) -> Callable[[], Tensor]:
    """A forward without grad (all logits), inside ``context()``."""

    def forward() -> Tensor:
        with torch.no_grad(), context():
            return model(input_ids=ids, **kwargs).logits

    return forward


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(parameters: list[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW, fused where this torch has it on the CPU (torch >= 2.4), one group."""
    try:
        return torch.optim.AdamW(parameters, lr=LEARNING_RATE, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(parameters, lr=LEARNING_RATE)


def train_step_call(
    model: nn.Module,
    ids: Tensor,
    context: Callable[[], AbstractContextManager],
    optimizer: torch.optim.Optimizer,
) -> Callable[[], Tensor]:
    """One training step: grads to None, forward with ``labels`` (causal-LM loss) inside
    ``context()``, backward, ``optimizer.step()``. Returns the loss."""

    def step() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        with context():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step
