"""The method options of ``lightning-peft fit`` and the adapter config they build.

``--method`` takes the registry's method names (``lightning_peft.methods.METHODS``) plus
``dora`` (LoRA with ``use_dora=True``). Each method takes some of the method options
(``METHOD_OPTIONS``); one given to a method that does not take it is refused by name. The options
default to None ("not given"), so that refusal can tell a value the user wrote from a default;
``OPTION_DEFAULTS`` fills the ones a method takes.

Defaults per task (``DEFAULT_TARGETS``, ``DEFAULT_FEEDFORWARD``):

- LoRA / DoRA: all-linear for the LLM tasks; the attention query/value projections of the usual
  encoder families for classification (names absent from a model are simply not matched).
- bottleneck adapter: after each MLP block (``mlp``, Pfeiffer et al.'s placement) of an LLM; after
  each ``output.dense`` of an encoder.
- IA³: peft's table for Llama (keys, values, and ``down_proj`` scaled on its input, i.e. the
  feed-forward intermediate activation); for an encoder the same on BERT's names, written as
  regular expressions so that the attention's ``attention.output.dense`` is *not* taken for the
  feed-forward ``output.dense`` (peft's own list, ``["output.dense"]``, matches both).
- prompt tuning: 20 virtual tokens at random (``--prompt_init TEXT`` starts them from the
  embedding of a text's tokens, read with the model directory's tokenizer); task type
  ``CAUSAL_LM`` for the LLM tasks, ``FEATURE_EXTRACTION`` for the encoder (the task's pooling
  skips the virtual positions).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Any

from lightning_peft.core.config import ALL_LINEAR, is_positive_int
from lightning_peft.core.errors import InputError
from lightning_peft.methods.bottleneck.config import AdapterConfig
from lightning_peft.methods.ia3.config import IA3Config
from lightning_peft.methods.lora.config import LoRAConfig
from lightning_peft.methods.prompt_tuning.config import PromptTuningConfig
from lightning_peft.methods.registry import METHODS as REGISTERED_METHODS

DORA = "dora"  # not a registered method: LoRA's DoRA variant


def _method_choices() -> tuple[str, ...]:
    names = [method.name for method in REGISTERED_METHODS]
    at = names.index("lora") + 1
    return (*names[:at], DORA, *names[at:])


METHOD_CHOICES = _method_choices()
# The options each method takes (by the parser's names).
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "lora": ("rank", "alpha", "dropout", "targets"),
    DORA: ("rank", "alpha", "dropout", "targets"),
    "adapter": ("rank", "dropout", "targets"),
    "ia3": ("targets", "feedforward"),
    "prompt-tuning": ("virtual_tokens", "prompt_init"),
}
OPTION_DEFAULTS: dict[str, Any] = {"rank": 16, "alpha": 32.0, "dropout": 0.05, "virtual_tokens": 20}
# AdamW's learning rate per method when --model.lr is not given (others: the task's default,
# 1e-3 for the LLM tasks): a vector or a prompt of a few thousand numbers needs larger steps
# than LoRA's factors (measured on the demo task: README, Methods).
METHOD_LR: dict[str, float] = {"ia3": 1e-2, "prompt-tuning": 3e-2}
REGEX_PREFIX = "re:"
NO_FEEDFORWARD = "none"
# Default targets: task -> method -> target_modules.
_ENCODER_IA3 = (
    r"(.*\.)?(attention\.self\.(key|value)|layer\.\d+\.output\.dense|k_proj|v_proj|down_proj)"
)
_LLM = {"lora": ALL_LINEAR, "adapter": ["mlp"], "ia3": ["k_proj", "v_proj", "down_proj"]}
DEFAULT_TARGETS: dict[str, dict[str, list[str] | str]] = {
    "classification": {
        "lora": ["query", "value", "q_proj", "v_proj", "c_attn"],
        "adapter": ["output.dense"],
        "ia3": _ENCODER_IA3,
    },
    "instruct": _LLM,
    "causal-lm": _LLM,
}
# IA³'s feed-forward modules (scaled on their input), as full-match regexes: they apply to any
# --targets (a list entry would have to be one of the target names, peft's subset rule).
DEFAULT_FEEDFORWARD = {
    "classification": r"(.*\.)?(layer\.\d+\.output\.dense|down_proj)",
    "instruct": r"(.*\.)?down_proj",
    "causal-lm": r"(.*\.)?down_proj",
}
PROMPT_TASK_TYPE = {
    "instruct": "CAUSAL_LM",
    "causal-lm": "CAUSAL_LM",
    "classification": "FEATURE_EXTRACTION",
}

TARGETS_HELP = (
    "what to adapt: NAME or NAME,NAME,... (a module matches when its name is NAME or ends in "
    "'.NAME', as peft's lists); all-linear (every linear layer but the output layer); "
    "re:REGEX (a regular expression that must match a module's whole name, e.g. "
    "'re:.*layers\\.[0-3]\\..*_proj'). Default: all-linear for instruct/causal-lm, "
    "query,value,q_proj,v_proj,c_attn for classification (adapter: mlp / output.dense; ia3: "
    "k_proj,v_proj,down_proj / BERT's key, value and feed-forward output.dense). Not with "
    "prompt-tuning"
)
FEEDFORWARD_HELP = (
    "ia3: which targets are feed-forward layers, scaled on their input instead of their output: "
    "NAME,NAME,... (a target whose name ends with NAME, peft's rule; each must be one of "
    "--targets' names when those are names), re:REGEX, or none. Default: down_proj (LLM tasks), "
    "BERT's layer.N.output.dense (classification)"
)


def _option(name: str) -> str:
    return f"--{name}"


def parse_names(
    value: list[str] | str | None, option: str = "--targets", allow_all_linear: bool = True
) -> list[str] | str | None:
    """``--targets``-style value as peft's ``target_modules``: "a,b" -> ["a", "b"] (names, peft's
    suffix match), "all-linear" stays, "re:REGEX" -> "REGEX" (a full-match regex); a YAML list
    is names.

    Raises:
        InputError: an empty name, a name with regex characters (say ``re:``), a bad regex,
            all-linear where ``allow_all_linear`` is False.
    """
    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        if value == ALL_LINEAR:
            if not allow_all_linear:
                raise InputError(f"{option} does not take all-linear: name the modules")
            return ALL_LINEAR
        if value.startswith(REGEX_PREFIX):
            pattern = value[len(REGEX_PREFIX) :]
            if not pattern:
                raise InputError(f"{option} re: needs a regular expression after 're:'")
            try:
                re.compile(pattern)
            except re.error as error:
                raise InputError(
                    f"{option} {value!r} is not a valid regular expression: {error}"
                ) from None
            return pattern
        names = [name.strip() for name in value.split(",")]
    else:
        names = [str(name).strip() for name in value]
    if not names or any(not name for name in names):
        raise InputError(f"{option} {value!r} has an empty module name")
    for name in names:
        if re.search(r"[\s*+?()\[\]{}|^$\\]", name):
            raise InputError(
                f"{option}: {name!r} is not a module name; for a regular expression write re:{name}"
            )
    return names


def parse_targets(value: list[str] | str | None) -> list[str] | str | None:
    """``--targets`` as ``target_modules`` (see ``parse_names``)."""
    return parse_names(value, "--targets")


@dataclass
class MethodOptions:
    """The method options as given on the command line (None: not given)."""

    method: str = "lora"
    rank: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    targets: list[str] | str | None = None
    feedforward: list[str] | str | None = None
    virtual_tokens: int | None = None
    prompt_init: str | None = None

    @classmethod
    def from_namespace(cls, config: Any) -> MethodOptions:
        return cls(**{f.name: config.get(f.name) for f in fields(cls)})

    def given(self) -> list[str]:
        """The options given (not None), in the order of the fields."""
        names = [f.name for f in fields(self) if f.name != "method"]
        return [name for name in names if getattr(self, name) is not None]

    def value(self, name: str) -> Any:
        value = getattr(self, name)
        return OPTION_DEFAULTS.get(name) if value is None else value

    def check(self) -> None:
        """Every problem the options have without a model: an unknown method, an option the
        method does not take, a value out of range or unparsable.

        Raises:
            InputError: one line naming the option.
        """
        method = self.method
        if method not in METHOD_CHOICES:
            raise InputError(
                f"unknown method {method!r}; choose one of {', '.join(METHOD_CHOICES)}"
            )
        if method not in METHOD_OPTIONS:  # a registered method this command cannot build yet
            raise InputError(f"--method {method} is not available on the command line yet")
        takes = METHOD_OPTIONS[method]
        for name in self.given():
            if name not in takes:
                raise InputError(
                    f"{_option(name)} does not apply to --method {method} (it takes "
                    f"{', '.join(_option(o) for o in takes)})"
                )
        rank, dropout, alpha = self.value("rank"), self.value("dropout"), self.value("alpha")
        if "rank" in takes and not is_positive_int(rank):
            raise InputError(f"--rank must be an integer >= 1, got {rank!r}")
        if "dropout" in takes and not 0.0 <= dropout < 1.0:
            raise InputError(f"--dropout must be in [0, 1), got {dropout!r}")
        if "alpha" in takes and (not math.isfinite(alpha) or alpha <= 0):
            raise InputError(f"--alpha must be a positive number, got {alpha!r}")
        tokens = self.value("virtual_tokens")
        if "virtual_tokens" in takes and not is_positive_int(tokens):
            raise InputError(f"--virtual_tokens must be an integer >= 1, got {tokens!r}")
        if self.prompt_init is not None and not self.prompt_init.strip():
            raise InputError("--prompt_init needs a text (its tokens start the virtual tokens)")
        targets = parse_targets(self.targets)
        if method == "adapter" and targets == ALL_LINEAR:
            raise InputError(
                "--method adapter does not take --targets all-linear: bottleneck adapters go on "
                "the outputs of named modules (e.g. --targets mlp)"
            )
        self._feedforward()

    def _feedforward(self) -> list[str] | str | None:
        """``--feedforward`` as ``feedforward_modules`` (None: not given)."""
        value = self.feedforward
        if isinstance(value, str) and value.strip() == NO_FEEDFORWARD:
            return []
        return parse_names(value, "--feedforward", allow_all_linear=False)

    def build(
        self, task: str = "instruct", model_path: str | None = None
    ) -> LoRAConfig | AdapterConfig | IA3Config | PromptTuningConfig:
        """The adapter config (after ``check``); ``model_path``: the tokenizer of
        ``--prompt_init``.

        Raises:
            InputError: the options' problems (``check``), or the config's own refusal.
        """
        self.check()
        method, targets = self.method, parse_targets(self.targets)
        family = "lora" if method == DORA else method
        if targets is None and method != "prompt-tuning":
            targets = DEFAULT_TARGETS[task][family]
        try:
            if method in ("lora", DORA):
                return LoRAConfig(
                    r=self.value("rank"),
                    lora_alpha=self.value("alpha"),
                    target_modules=targets,
                    lora_dropout=self.value("dropout"),
                    use_dora=method == DORA,
                )
            if method == "adapter":
                return AdapterConfig(
                    bottleneck_dim=self.value("rank"),
                    target_modules=targets,
                    dropout=self.value("dropout"),
                )
            if method == "ia3":
                feedforward = self._feedforward()
                return IA3Config(
                    target_modules=targets,
                    feedforward_modules=(
                        DEFAULT_FEEDFORWARD[task] if feedforward is None else feedforward
                    ),
                )
            text = {}
            if self.prompt_init is not None:
                if model_path is None:
                    raise InputError("--prompt_init needs the model directory (its tokenizer)")
                text = {
                    "prompt_tuning_init": "TEXT",
                    "prompt_tuning_init_text": self.prompt_init,
                    "tokenizer_name_or_path": str(model_path),
                }
            return PromptTuningConfig(
                num_virtual_tokens=self.value("virtual_tokens"),
                task_type=PROMPT_TASK_TYPE[task],
                **text,
            )
        except InputError:
            raise
        except ValueError as error:  # what the config itself refuses, on one line
            raise InputError(f"--method {method}: {' '.join(str(error).split())}") from None


def build_peft_config(
    method: str,
    task: str = "instruct",
    model_path: str | None = None,
    **options: Any,
) -> LoRAConfig | AdapterConfig | IA3Config | PromptTuningConfig:
    """The adapter config of the command-line options (``MethodOptions``' fields; None or
    missing: not given); every problem is an ``InputError``."""
    return MethodOptions(method, **options).build(task, model_path)


def describe(method: str, config: Any) -> str:
    """What the run adapts, for the command's first line (e.g. "LoRA r=16 on all-linear")."""

    def shown(targets: list[str] | str) -> str:
        if isinstance(targets, list):
            return ",".join(targets)
        return targets if targets == ALL_LINEAR else f"re:{targets}"

    if isinstance(config, LoRAConfig):
        kind = "DoRA" if config.use_dora else "LoRA"
        return f"{kind} r={config.r} on {shown(config.target_modules)}"
    if isinstance(config, AdapterConfig):
        return (
            f"bottleneck adapter (width {config.bottleneck_dim}) on {shown(config.target_modules)}"
        )
    if isinstance(config, IA3Config):
        feedforward = config.feedforward_modules
        return (
            f"IA³ on {shown(config.target_modules)} (feed-forward: "
            f"{shown(feedforward) if feedforward else 'none'})"
        )
    if isinstance(config, PromptTuningConfig):
        init = (
            f"from the text {config.prompt_tuning_init_text!r}"
            if config.prompt_tuning_init == "TEXT"
            else "at random"
        )
        return f"prompt tuning, {config.num_virtual_tokens} virtual tokens {init}"
    return method
