"""IA³ on the command line (``--method ia3``): peft's table for Llama (keys, values, and
``down_proj`` scaled on its input, i.e. the feed-forward intermediate activation); for an encoder
the same on BERT's names, written as regular expressions so that the attention's
``attention.output.dense`` is *not* taken for the feed-forward ``output.dense`` (peft's own list,
``["output.dense"]``, matches both)."""

from __future__ import annotations

from lightning_peft.core.command_line import (
    TARGETS,
    CommandLine,
    Option,
    OptionValues,
    parse_names,
    shown_targets,
)
from lightning_peft.core.errors import InputError
from lightning_peft.methods.ia3.config import IA3Config

NO_FEEDFORWARD = "none"
_ENCODER = (
    r"(.*\.)?(attention\.self\.(key|value)|layer\.\d+\.output\.dense|k_proj|v_proj|down_proj)"
)
_LLM = ["k_proj", "v_proj", "down_proj"]
# The feed-forward modules (scaled on their input), as full-match regexes: they apply to any
# --targets (a list entry would have to be one of the target names, peft's subset rule).
DEFAULT_FEEDFORWARD = {
    "classification": r"(.*\.)?(layer\.\d+\.output\.dense|down_proj)",
    "instruct": r"(.*\.)?down_proj",
    "causal-lm": r"(.*\.)?down_proj",
}
FEEDFORWARD_HELP = (
    "which targets are feed-forward layers, scaled on their input instead of their output: "
    "NAME,NAME,... (a target whose name ends with NAME, peft's rule; each must be one of "
    "--targets' names when those are names), re:REGEX, or none. Default: down_proj (LLM tasks), "
    "BERT's layer.N.output.dense (classification)"
)


def parse_feedforward(value: list[str] | str) -> list[str] | str:
    """``--feedforward`` as ``feedforward_modules`` (``none``: no feed-forward module)."""
    if isinstance(value, str) and value.strip() == NO_FEEDFORWARD:
        return []
    return parse_names(value, "--feedforward", allow_all_linear=False)


def build(choice: str, values: OptionValues, task: str, model_path: str | None) -> IA3Config:
    feedforward = values["feedforward"]
    return IA3Config(
        target_modules=values["targets"],
        feedforward_modules=DEFAULT_FEEDFORWARD[task] if feedforward is None else feedforward,
    )


def check_plan(config: IA3Config, targets: list[str], values: OptionValues) -> None:
    """A ``--feedforward`` given must select some of the planned targets."""
    if "feedforward" in values and config.feedforward_modules:
        if not any(config.is_feedforward(name) for name in targets):
            raise InputError(
                f"--feedforward {config.feedforward_modules!r} matches none of the "
                f"{len(targets)} adapted modules (e.g. {targets[0]!r}); name feed-forward "
                "targets, or pass none"
            )


def describe(config: IA3Config) -> str:
    feedforward = config.feedforward_modules
    return (
        f"IA³ on {shown_targets(config.target_modules)} (feed-forward: "
        f"{shown_targets(feedforward) if feedforward else 'none'})"
    )


COMMAND_LINE = CommandLine(
    choices=("ia3",),
    options=(
        TARGETS,
        Option("feedforward", list[str] | str | None, FEEDFORWARD_HELP, parse=parse_feedforward),
    ),
    build=build,
    describe=describe,
    default_targets={"classification": _ENCODER, "instruct": _LLM, "causal-lm": _LLM},
    lr=1e-2,  # a vector of a few thousand numbers needs larger steps than LoRA's factors
    check_plan=check_plan,
)
