"""The whole-model benchmark's contestants: one causal LM, many ways to adapt it.

Every variant shares the frozen base weights of one loaded model (a ``copy.deepcopy`` whose
memo maps each parameter and buffer to itself), except ``merged``, which owns a copy because
merging writes into W. Variants:

- ``floor``: the model without adapters, every weight frozen; a training step backpropagates to
  the input embeddings only (``inputs_embeds`` requires grad): the cost no adapter can avoid.
- ``ours``: ``lightning_peft.inject_adapters`` (LoRA or DoRA on all linear layers but the output
  layer); ``peft``: ``peft.inject_adapter_in_model`` with the same config and, copied in through
  the PEFT file format, the same adapter values (B non-zero, so the adapters do real work).
- ``merged``: ours, merged into (a copy of) the base weights: what decoding costs after merging.

A training step is ``grads = None``, forward with ``labels`` (the causal-LM loss), backward.
Decoding is ``generate`` of a fixed number of new tokens, greedy, batch 1.
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

METHODS = ("lora", "dora")
METHOD_NAMES = {"lora": "LoRA", "dora": "DoRA"}
PEFT_KEY_PREFIX = "base_model.model."

# SmolLM2-135M-Instruct's shape (its config.json without the tokenizer fields), for
# ``--random-weights`` where the embedded model is not installed: speed does not depend on values.
SMOLLM2_SHAPE = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
}
# A tiny Llama for ``--quick`` (the tests): seconds on one thread.
TINY_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 512,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}


def peft_installed() -> bool:
    return importlib.util.find_spec("peft") is not None


@dataclass(frozen=True)
class AdapterSpec:
    """LoRA or DoRA on every linear layer but the output layer."""

    method: str
    dropout_p: float
    rank: int = 16
    alpha: float = 32.0

    def label(self) -> str:
        return f"{METHOD_NAMES[self.method]} p={self.dropout_p:g}"


def load_base_model(
    model_dir: Path | None, shape: dict | None, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """The causal LM from ``model_dir``, or with random weights of ``shape`` (a Llama config)."""
    import transformers

    transformers.logging.set_verbosity_error()
    # loaded in its stored dtype, then cast: the keyword for the dtype changed across
    # transformers releases (torch_dtype -> dtype)
    if model_dir is not None:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    else:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**shape))
    model.to(device=device, dtype=dtype)
    model.requires_grad_(False)
    return model


def shared_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are the original objects."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def _ours_config(spec: AdapterSpec, init_random: bool):
    from lightning_peft import LoRAConfig

    return LoRAConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout_p,
        target_modules="all-linear",
        use_dora=spec.method == "dora",
        init_lora_weights=not init_random,
    )


def build_ours(base: nn.Module, spec: AdapterSpec, adapter_dir: Path) -> nn.Module:
    """lightning-peft on a weight-sharing copy of ``base``, with the adapter in ``adapter_dir``."""
    from lightning_peft import load_adapter

    model = shared_copy(base)
    load_adapter(model, adapter_dir)
    model.train()
    return model


def build_peft(base: nn.Module, spec: AdapterSpec, adapter_dir: Path) -> nn.Module:
    """peft on a weight-sharing copy of ``base``, holding the same adapter values as ours."""
    import peft
    from peft.tuners.tuners_utils import cast_adapter_dtype
    from safetensors.torch import load_file

    model = shared_copy(base)
    config = peft.LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout_p,
        target_modules="all-linear",
        use_dora=spec.method == "dora",
    )
    model = peft.inject_adapter_in_model(config, model)
    # float16/bfloat16 bases get float32 adapters, as peft.get_peft_model gives them
    cast_adapter_dtype(model, adapter_name="default")
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    tensors = {key.removeprefix(PEFT_KEY_PREFIX): value for key, value in tensors.items()}
    result = peft.set_peft_model_state_dict(model, tensors)
    missing = [key for key in result.missing_keys if "lora_" in key]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"peft did not take the adapter: missing {missing[:3]}, "
            f"unexpected {list(result.unexpected_keys)[:3]}"
        )
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    model.train()
    return model


def write_adapter(base: nn.Module, spec: AdapterSpec, directory: Path) -> int:
    """Inject ours with random A and B into a shared copy, save it; returns the adapted count."""
    from lightning_peft import inject_adapters, save_adapter

    model = shared_copy(base)
    torch.manual_seed(1)
    report = inject_adapters(model, _ours_config(spec, init_random=True))
    with torch.no_grad():  # B at a small scale, as after some training
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(0.05)
    save_adapter(model, directory)
    return len(report.modules)


def build_merged(base: nn.Module, adapter_dir: Path) -> nn.Module:
    """Ours merged into a copy of the base weights (merging writes into W)."""
    from lightning_peft import load_adapter, merge_adapters

    model = copy.deepcopy(base)
    load_adapter(model, adapter_dir)
    merge_adapters(model)
    model.eval()
    return model


@dataclass
class Variant:
    """One model ready to run: a training step and/or a decode."""

    name: str  # e.g. "floor", "ours", "peft", "merged", "base"
    spec: AdapterSpec | None
    model: nn.Module
    step: Callable[[], Tensor] | None = None  # returns the loss (backward already done)
    forward_loss: Callable[[], Tensor] | None = None  # forward only, graph kept
    decode: Callable[[], None] | None = None

    @property
    def key(self) -> str:
        return self.name if self.spec is None else f"{self.spec.label()} {self.name}"


def make_batch(vocab: int, batch: int, seq: int, device: torch.device) -> Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, seq), generator=generator).to(device)


def training_callables(
    model: nn.Module, ids: Tensor, floor: bool, optimize: bool = False
) -> tuple[Callable[[], Tensor], Callable[[], Tensor]]:
    """``(forward_loss, step)`` for ``model`` on the batch ``ids`` (labels = ids).

    ``forward_loss`` clears the gradients and returns the loss with its graph; ``step`` runs it,
    backward and, with ``optimize``, an AdamW step over the trained parameters, and returns the
    detached loss. The floor feeds ``inputs_embeds`` that require grad (all weights are frozen,
    so backward would otherwise have nothing to do); adapted models take ``input_ids`` as in
    training.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if floor and trainable:
        raise ValueError("the floor must have every weight frozen")
    if not floor and not trainable:
        raise ValueError("an adapted model without trainable parameters")
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if optimize and trainable else None
    embed = model.get_input_embeddings()

    def forward_loss() -> Tensor:
        for parameter in trainable:
            parameter.grad = None
        if floor:
            with torch.no_grad():
                embeddings = embed(ids)
            embeddings.requires_grad_(True)
            return model(inputs_embeds=embeddings, labels=ids).loss
        return model(input_ids=ids, labels=ids).loss

    def step() -> Tensor:
        loss = forward_loss()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        return loss.detach()

    return forward_loss, step


def decode_callable(
    model: nn.Module,
    prompt: Tensor,
    new_tokens: int,
    context: Callable[[], AbstractContextManager] = nullcontext,
    **kwargs,
) -> Callable[[], Tensor]:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens after ``prompt`` (B, T), inside
    ``context()`` (``kwargs`` to ``generate``, e.g. peft's ``adapter_names``); returns the new
    tokens (B, new_tokens)."""
    mask = torch.ones_like(prompt)

    def decode() -> Tensor:
        with torch.no_grad(), context():
            out = model.generate(
                input_ids=prompt,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
                **kwargs,
            )
        if out.shape[1] != prompt.shape[1] + new_tokens:
            raise RuntimeError(f"generate returned {out.shape[1] - prompt.shape[1]} new tokens")
        return out[:, prompt.shape[1] :]

    return decode


def model_source(args) -> tuple[Path | None, dict | None, str]:
    """(directory, random-weight shape, display name) of the model a benchmark runs on, from
    its ``--quick``, ``--random-weights`` and ``--model`` options (else the embedded SmolLM2)."""
    if args.quick:
        return None, TINY_SHAPE, "tiny random Llama"
    if args.random_weights:
        return None, SMOLLM2_SHAPE, "SmolLM2-135M shape, random weights"
    if args.model is not None:
        return args.model, None, args.model.name
    from lightning_peft.cli.embedded import smollm2_path

    path = smollm2_path()
    return path, None, path.name


def adapter_dir_for(root: Path, spec: AdapterSpec) -> Path:
    return root / f"{spec.method}-p{spec.dropout_p:g}"


def temporary_root() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="lightning-peft-bench-")
