"""Prompt tuning (Lester et al. 2021, https://arxiv.org/abs/2104.08691): ``n`` trained "virtual
token" embeddings ``P`` (n, d) prepended to every input sequence of a frozen transformers model.

The model keeps its modules; the adapter is a ``PromptEmbedding`` held as the child
``prompt_tuning`` of the input embedding (``get_input_embeddings()``), and a forward pre-hook on
the adapted model extends each call as peft's ``PeftModelFor*`` classes do:

- ``inputs_embeds ← [P; embed(input_ids)]`` (or ``[P; inputs_embeds]``), ``input_ids ← None``;
- a 2-D ``attention_mask`` gets ``n`` leading ones;
- causal-LM ``labels`` get ``n`` leading ``-100`` (no loss on the virtual tokens);
- sequence classification: ``token_type_ids`` get ``n`` leading zeros, ``labels`` are kept;
- a call that continues from a cache already holding the virtual tokens (``generate``'s later
  steps) only has its attention mask extended, so ``model.generate()`` works unchanged.

- given ``position_ids`` (``generate`` makes them from the attention mask): the virtual tokens
  take positions 0..n-1 and the given ones move up by n. Without padding that is what the model
  does with no ``position_ids`` (positions 0..n+T-1); peft drops given ones with a warning, which
  differs for left-padded rows.

What cannot be extended exactly is refused by name on the call, before the model runs:
positional arguments the forward's signature does not name, ``token_type_ids`` outside sequence
classification (peft drops them), a mask, position or token-type tensor that is not 2-D. A
call that reaches the model's body without passing through the adapted model (e.g.
``model.model(...)`` on a ``LlamaForCausalLM``) would silently skip the prompt: it raises.

Saved as peft saves it: the one tensor ``prompt_embeddings`` (n, d), ``modules_to_save`` under
``base_model.<key>``. It does not merge: the virtual tokens are inputs, not a change of weights.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_peft.core.adapter import (
    AdapterLayer,
    Method,
    base_model_name,
    config_from_file,
    keep_hook_handles,
    remove_hook_handles,
)
from lightning_peft.core.matching import inside_modules_to_save
from lightning_peft.methods.prompt_tuning.cli import COMMAND_LINE
from lightning_peft.methods.prompt_tuning.config import (
    PROMPT_TASKS,
    PromptTuningConfig,
    check_tokenizer_directory,
)

CHILD_NAME = "prompt_tuning"


PROMPT_KEY = "prompt_embeddings"


def text_token_ids(config: PromptTuningConfig, count: int, vocab_size: int) -> list[int]:
    """The token ids of ``config.prompt_tuning_init_text``, cut or repeated to ``count`` (peft's
    rule; special tokens included, as the tokenizer adds them).

    Raises:
        ValueError: no local tokenizer there, a text without tokens, or an id outside the
            embedding (not the model's tokenizer).
    """
    from transformers import AutoTokenizer

    directory = check_tokenizer_directory(config.tokenizer_name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(directory), local_files_only=True, **(config.tokenizer_kwargs or {})
        )
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"could not load a tokenizer from {directory}: {error}") from None
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ValueError(
            f"prompt_tuning_init_text={config.prompt_tuning_init_text!r} has no tokens"
        )
    ids = (ids * math.ceil(count / len(ids)))[:count]
    outside = [i for i in ids if not 0 <= i < vocab_size]
    if outside:
        raise ValueError(
            f"the tokenizer in {directory} gives token id {outside[0]} but the model's input "
            f"embedding has {vocab_size} rows: is it this model's tokenizer?"
        )
    return ids


@dataclass(frozen=True)
class PromptPlacement:
    """The layer becomes the child ``child`` of the input embedding; the adapted model (the
    root given to ``inject_adapters``) gets the pre-hook that extends its inputs, a hook that
    closes the call, and its body (``base_model``) a guard against calls that bypass it. The
    hooks are module-level functions (they survive ``deepcopy``)."""

    child: str

    def layer_path(self, target: str) -> str:
        return f"{target}.{self.child}"

    def target_path(self, layer_path: str) -> str:
        return layer_path.removesuffix(self.child).removesuffix(".")

    def check(self, model: nn.Module, target: str, paths: list[str]) -> None:
        """The hooks act on the root: nothing to refuse about where the embedding sits."""

    def attach(self, model: nn.Module, target: str, layer: PromptEmbedding) -> None:
        model.get_submodule(target).add_module(self.child, layer)
        object.__setattr__(layer, "root", model)  # not a child: no cycle in modules()
        keep_hook_handles(
            layer,
            model.register_forward_pre_hook(_extend_inputs, with_kwargs=True),
            model.register_forward_hook(_close_call, always_call=True),
        )
        body = _body(model)
        if body is not None:
            keep_hook_handles(layer, body.register_forward_pre_hook(_refuse_bypass))

    def detach(self, model: nn.Module, layer_path: str, layer: PromptEmbedding) -> None:
        remove_hook_handles(layer)
        delattr(model.get_submodule(self.target_path(layer_path)), self.child)


class PromptEmbedding(AdapterLayer):
    """The virtual tokens P (n, d) of prompt tuning; ``forward(batch)`` gives (batch, n, d).

    Its tensor is ``embedding``, saved as ``prompt_embeddings`` (peft's key, without a path).
    """

    adapts_kinds = ("the input nn.Embedding of a transformers model",)

    placement = PromptPlacement(CHILD_NAME)
    mergeable = False
    why_not_mergeable = (
        "(prompt tuning) cannot be merged into weights: the virtual tokens are extra inputs, "
        "not a change of any weight; remove them with unload(model, merge=False)"
    )
    saved_names: ClassVar[dict[str, str]] = {"embedding": PROMPT_KEY}

    def __init__(
        self,
        num_virtual_tokens: int,
        token_dim: int,
        task_type: str,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if task_type not in PROMPT_TASKS:
            raise ValueError(f"task_type must be one of {PROMPT_TASKS}, got {task_type!r}")
        self.embedding = nn.Parameter(
            torch.empty(num_virtual_tokens, token_dim, dtype=dtype, device=device)
        )
        nn.init.normal_(self.embedding)  # RANDOM, as peft's nn.Embedding
        self.task_type = task_type
        self.disabled = False
        self.merged = False
        self.calls = 0  # calls of the adapted model in progress (the bypass guard reads it)

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.shape[0]

    # -- the protocol ---------------------------------------------------------------------------

    @classmethod
    def adapts(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    @classmethod
    def check(cls, module: nn.Module, config: PromptTuningConfig, name: str) -> None:
        if config.token_dim is not None and config.token_dim != module.embedding_dim:
            raise ValueError(
                f"token_dim={config.token_dim} but the input embedding {name!r} has width "
                f"{module.embedding_dim}"
            )
        if config.prompt_tuning_init == "TEXT" and not config.inference_mode:
            text_token_ids(config, config.num_virtual_tokens, module.num_embeddings)

    @classmethod
    def adapter_shapes(cls, module: nn.Module, config: PromptTuningConfig, name: str) -> dict:
        return {"embedding": (config.num_virtual_tokens, module.embedding_dim)}

    @classmethod
    def peft_key(cls, layer_path: str, local_name: str) -> str:
        """peft saves the virtual tokens as the one key ``prompt_embeddings``."""
        return cls.saved_name(local_name)

    @classmethod
    @torch.no_grad()
    def build(cls, module: nn.Module, config: PromptTuningConfig, name: str) -> PromptEmbedding:
        n, weight = config.num_virtual_tokens, module.weight
        layer = cls(
            n,
            module.embedding_dim,
            config.task_type,
            dtype=getattr(torch, config.adapter_dtype),
            device=weight.device,
        )
        ids = None
        if config.inference_mode:
            pass  # the weights will be loaded: peft skips the init too
        elif config.prompt_tuning_init == "TEXT":
            ids = text_token_ids(config, n, module.num_embeddings)
        elif config.prompt_tuning_init == "SAMPLE_VOCAB":
            ids = torch.randint(0, module.num_embeddings, (n,)).tolist()
        if ids is not None:
            rows = weight[torch.tensor(ids, device=weight.device)]
            layer.embedding.copy_(rows.to(layer.embedding.dtype))
        object.__setattr__(layer, "target_module", module)  # not a child: no cycle
        return layer

    def adapter_parameter_names(self) -> list[str]:
        return ["embedding"]

    @property
    def base_layer(self) -> nn.Module:
        return self.__dict__.get("target_module")

    def describe(self) -> tuple[str, str, int]:
        n, d = self.embedding.shape
        return "Prompt", f"{n} tokens x {d}", n

    def forward(self, batch_size: int) -> Tensor:
        """P repeated for the batch: (batch_size, n, d)."""
        return self.embedding.unsqueeze(0).expand(batch_size, -1, -1)

    def extra_repr(self) -> str:
        n, d = self.embedding.shape
        return f"num_virtual_tokens={n}, token_dim={d}, task_type={self.task_type}"


def _layer_of(model: nn.Module) -> PromptEmbedding:
    return getattr(model.get_input_embeddings(), CHILD_NAME)


def _body(root: nn.Module) -> nn.Module | None:
    """The transformers body inside ``root`` (``root.base_model``), if it is another module."""
    body = getattr(root, "base_model", None)
    return body if isinstance(body, nn.Module) and body is not root else None


def _cache_length(cache: Any) -> int:
    """Tokens already in a key/value cache (a transformers ``Cache`` or legacy tuples)."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
        return int(cache[0][0].shape[-2])
    return 0


def _by_name(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """``kwargs`` with the positional ``args`` named by ``model.forward``'s signature."""
    if not args:
        return dict(kwargs)
    named = []  # the names positional arguments take, in order, until *args or keyword-only
    for param in inspect.signature(model.forward).parameters.values():
        if param.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD:
            break
        named.append(param.name)
    if len(args) > len(named):
        raise ValueError(
            f"prompt tuning cannot tell what {len(args)} positional argument(s) of "
            f"{type(model).__name__}.forward are (its signature names {named or 'none'}); call "
            "it with keyword arguments: input_ids=..., attention_mask=..., labels=..."
        )
    out = dict(kwargs)
    for name, value in zip(named, args, strict=False):
        if name in out:
            raise TypeError(f"{type(model).__name__}.forward got {name!r} twice")
        out[name] = value
    return out


def _prepend(tensor: Tensor, n: int, value: int | float) -> Tensor:
    """(batch, T) -> (batch, n + T) with ``value`` in the first n columns."""
    pad = torch.full((tensor.shape[0], n), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat((pad, tensor), dim=1)


def _shape(value: Any) -> object:
    return tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__


def _extend_inputs(model: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of the adapted model: prepend the virtual tokens (see the module doc)."""
    layer = _layer_of(model)
    layer.calls += 1  # first: _close_call always undoes it
    if layer.disabled:
        return None
    kwargs = _by_name(model, args, kwargs)
    n, name = layer.num_virtual_tokens, type(model).__name__
    for key in ("attention_mask", "position_ids", "token_type_ids"):
        value = kwargs.get(key)
        if value is not None and (not isinstance(value, Tensor) or value.dim() != 2):
            raise ValueError(
                f"prompt tuning extends a 2-D {key} (batch, length); {name} got {_shape(value)}"
            )
    if kwargs.get("token_type_ids") is not None and layer.task_type != "SEQ_CLS":
        raise ValueError(
            f"prompt tuning ({layer.task_type}) cannot extend token_type_ids (passed to {name}): "
            "peft drops them, which changes the model's result; call it without them"
        )
    continuing = _cache_length(kwargs.get("cache", kwargs.get("past_key_values"))) > 0
    input_ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    labels = kwargs.get("labels")
    if not continuing:
        if (input_ids is None) == (embeds is None):
            raise ValueError(
                f"prompt tuning needs exactly one of input_ids and inputs_embeds, passed to "
                f"{name} by name; got {'both' if embeds is not None else 'neither'}"
            )
        if labels is not None and layer.task_type == "CAUSAL_LM":
            if not isinstance(labels, Tensor) or labels.dim() != 2:
                raise ValueError(
                    f"prompt tuning (CAUSAL_LM) extends per-token labels (batch, length); {name} "
                    f"got labels of shape {_shape(labels)}"
                )
    # checked: extend
    if kwargs.get("attention_mask") is not None:
        kwargs["attention_mask"] = _prepend(kwargs["attention_mask"], n, 1)
    positions = kwargs.get("position_ids")
    if positions is not None:  # the virtual tokens take 0..n-1, the given positions move up
        positions = positions + n
        if not continuing:
            first = torch.arange(n, dtype=positions.dtype, device=positions.device)
            positions = torch.cat((first.expand(positions.shape[0], n), positions), dim=1)
        kwargs["position_ids"] = positions
    if continuing:
        return (), kwargs  # the cache already holds the virtual tokens (generate's later steps)
    if embeds is None:
        embeds = model.get_input_embeddings()(input_ids)
    kwargs["inputs_embeds"] = torch.cat((layer(embeds.shape[0]).to(embeds.dtype), embeds), dim=1)
    kwargs["input_ids"] = None
    if kwargs.get("token_type_ids") is not None:
        kwargs["token_type_ids"] = _prepend(kwargs["token_type_ids"], n, 0)
    if labels is not None and layer.task_type == "CAUSAL_LM":
        kwargs["labels"] = _prepend(labels, n, -100)
    return (), kwargs


def _close_call(model: nn.Module, args: tuple, output: Any) -> None:
    """Forward hook (always called, errors included): the call of the adapted model is over."""
    layer = _layer_of(model)
    layer.calls = max(0, layer.calls - 1)


def _refuse_bypass(body: nn.Module, args: tuple) -> None:
    """Forward pre-hook of the body: it must run inside a call of the adapted model."""
    layer = _layer_of(body)
    if layer.calls == 0 and not layer.disabled:
        root = layer.__dict__["root"]
        raise ValueError(
            f"prompt tuning prepends its virtual tokens in {type(root).__name__}.forward, but "
            f"{type(body).__name__} was called directly, which would skip them silently: call "
            f"the adapted {type(root).__name__} itself, or adapt the module you call (e.g. "
            "PEFTCallback(module=...))"
        )


def select_input_embedding(model: nn.Module, config: PromptTuningConfig) -> list[str]:
    """The name of ``model``'s input embedding, the one target of prompt tuning.

    Raises:
        ValueError: ``model`` is not a transformers model whose inputs can be extended (no
            ``get_input_embeddings``, an embedding that is no ``nn.Embedding`` inside it, a
            forward without ``inputs_embeds``).
    """
    kind = type(model).__name__
    need = (
        "prompt tuning needs a transformers model (get_input_embeddings, and a forward that "
        "takes inputs_embeds), to prepend its virtual tokens"
    )
    get = getattr(model, "get_input_embeddings", None)
    embedding = None
    if callable(get):
        try:
            embedding = get()
        except (NotImplementedError, AttributeError):
            embedding = None
    if embedding is None:
        raise ValueError(
            f"{need}; {kind} has no input embedding: adapt the transformers model itself "
            "(inject_adapters(model.<name>, ...) or PEFTCallback(module='<name>'))"
        )
    if not isinstance(embedding, nn.Embedding):
        raise ValueError(f"{need}; the input embedding of {kind} is a {type(embedding).__name__}")
    name = next((n for n, m in model.named_modules() if m is embedding and n), None)
    if name is None:
        raise ValueError(f"{need}; the input embedding of {kind} is not one of its submodules")
    if "inputs_embeds" not in inspect.signature(model.forward).parameters:
        raise ValueError(f"{need}; {kind}.forward takes no inputs_embeds")

    if inside_modules_to_save(config.modules_to_save, name):
        raise ValueError(
            f"the input embedding {name!r} is inside modules_to_save={config.modules_to_save!r}: "
            "prompt tuning reads it frozen; it cannot also be trained in full"
        )
    return [name]


def _config_value(model_config: Any, names: tuple[str, ...]) -> Any:
    return next((getattr(model_config, n) for n in names if hasattr(model_config, n)), None)


def write_prompt_config(model: nn.Module, config: PromptTuningConfig, targets: list[str]) -> dict:
    """peft's ``adapter_config.json`` for prompt tuning (peft's metadata fields filled as peft
    fills them from the model's config)."""
    embedding = model.get_submodule(targets[0])
    model_config = getattr(model, "config", None)
    return {
        "peft_type": "PROMPT_TUNING",
        "task_type": config.task_type,
        "num_virtual_tokens": config.num_virtual_tokens,
        "token_dim": embedding.embedding_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": _config_value(
            model_config, ("num_attention_heads", "n_head", "num_heads")
        ),
        "num_layers": _config_value(model_config, ("num_hidden_layers", "num_layers", "n_layer")),
        "prompt_tuning_init": config.prompt_tuning_init,
        "prompt_tuning_init_text": config.prompt_tuning_init_text,
        "tokenizer_name_or_path": config.tokenizer_name_or_path,
        "tokenizer_kwargs": config.tokenizer_kwargs,
        "modules_to_save": config.modules_to_save,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name(model),
    }


def read_prompt_config(data: dict, path: Path) -> PromptTuningConfig:
    """A ``PromptTuningConfig`` from peft's ``adapter_config.json`` content, or a
    ``ValueError`` naming ``path`` and the field that cannot be loaded."""
    data = {key: value for key, value in data.items() if value is not None}
    # modules_to_save: the task heads peft writes twice become one set in the config
    return config_from_file(PromptTuningConfig, data, path)


PROMPT_TUNING = Method(
    name="prompt-tuning",
    peft_type="PROMPT_TUNING",
    config_cls=PromptTuningConfig,
    layers=(PromptEmbedding,),
    write_config=write_prompt_config,
    read_config=read_prompt_config,
    label="prompt tuning",
    select=select_input_embedding,
    file_prefix="base_model.",
    command_line=COMMAND_LINE,
)
