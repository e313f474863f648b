"""Named adapters built the same way in peft and here, for the named-adapter and mixed-batch
tests: peft's ``PeftModel`` with several adapters (random B, so each acts), and a model of ours
loaded from the directories peft writes (``default`` at the root, the others in sub-directories).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_peft import load_adapter
from tests.helpers.tiny_models import tiny_llama


def peft_model(adapters: dict[str, dict], seed: int = 3):
    """peft's tiny Llama with ``adapters`` (name -> ``LoraConfig`` fields), in eval mode."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = None
    for name, fields in adapters.items():
        config = LoraConfig(init_lora_weights=False, **fields)
        if model is None:
            model = get_peft_model(tiny_llama(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    return model.eval()


def loaded(directory: Path, names) -> torch.nn.Module:
    """A tiny Llama of ours with each adapter of ``names`` loaded by name from peft's layout."""
    model = tiny_llama()
    for name in names:
        load_adapter(model, Path(directory) / ("" if name == "default" else name), name=name)
    return model.eval()
