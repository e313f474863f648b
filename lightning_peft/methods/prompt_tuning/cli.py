"""Prompt tuning on the command line (``--method prompt-tuning``): 20 virtual tokens at random
(``--prompt_init TEXT`` starts them from the embedding of a text's tokens, read with the model
directory's tokenizer); task type ``CAUSAL_LM`` for the LLM tasks, ``FEATURE_EXTRACTION`` for the
encoder (the task's pooling skips the virtual positions)."""

from __future__ import annotations

from lightning_peft.core.command_line import CommandLine, Option, OptionValues
from lightning_peft.core.config import is_positive_int
from lightning_peft.core.errors import InputError
from lightning_peft.methods.prompt_tuning.config import PromptTuningConfig

TASK_TYPE = {
    "instruct": "CAUSAL_LM",
    "causal-lm": "CAUSAL_LM",
    "classification": "FEATURE_EXTRACTION",
}


def _check_tokens(value) -> None:
    if not is_positive_int(value):
        raise InputError(f"--virtual_tokens must be an integer >= 1, got {value!r}")


def _check_text(value) -> None:
    if not value.strip():
        raise InputError("--prompt_init needs a text (its tokens start the virtual tokens)")


def build(
    choice: str, values: OptionValues, task: str, model_path: str | None
) -> PromptTuningConfig:
    text = {}
    if "prompt_init" in values:
        if model_path is None:
            raise InputError("--prompt_init needs the model directory (its tokenizer)")
        text = {
            "prompt_tuning_init": "TEXT",
            "prompt_tuning_init_text": values["prompt_init"],
            "tokenizer_name_or_path": str(model_path),
        }
    return PromptTuningConfig(
        num_virtual_tokens=values["virtual_tokens"], task_type=TASK_TYPE[task], **text
    )


def describe(config: PromptTuningConfig) -> str:
    init = (
        f"from the text {config.prompt_tuning_init_text!r}"
        if config.prompt_tuning_init == "TEXT"
        else "at random"
    )
    return f"prompt tuning, {config.num_virtual_tokens} virtual tokens {init}"


COMMAND_LINE = CommandLine(
    choices=("prompt-tuning",),
    options=(
        Option(
            "virtual_tokens", int, "the number of virtual tokens, >= 1", 20, check=_check_tokens
        ),
        Option(
            "prompt_init",
            str | None,
            "start the virtual tokens from the embeddings of this text's tokens (the model "
            "directory's tokenizer; cut or repeated to --virtual_tokens) instead of at random",
            check=_check_text,
        ),
    ),
    build=build,
    describe=describe,
    lr=3e-2,  # a prompt of a few thousand numbers needs larger steps than LoRA's factors
    target_option="--method prompt-tuning",
)
