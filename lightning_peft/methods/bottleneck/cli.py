"""Bottleneck adapters on the command line (``--method adapter``): after each MLP block
(``mlp``, Pfeiffer et al.'s placement) of an LLM; after each ``output.dense`` of an encoder."""

from __future__ import annotations

import dataclasses

from lightning_peft.core.command_line import (
    DROPOUT,
    RANK,
    TARGETS,
    CommandLine,
    OptionValues,
    shown_targets,
)
from lightning_peft.core.config import ALL_LINEAR
from lightning_peft.core.errors import InputError
from lightning_peft.methods.bottleneck.config import AdapterConfig


def check(choice: str, values: OptionValues) -> None:
    if "targets" in values and values["targets"] == ALL_LINEAR:
        raise InputError(
            "--method adapter does not take --targets all-linear: bottleneck adapters go on "
            "the outputs of named modules (e.g. --targets mlp)"
        )


def build(choice: str, values: OptionValues, task: str, model_path: str | None) -> AdapterConfig:
    return AdapterConfig(
        bottleneck_dim=values["rank"],
        target_modules=values["targets"],
        dropout=values["dropout"],
    )


def describe(config: AdapterConfig) -> str:
    return (
        f"bottleneck adapter (width {config.bottleneck_dim}) on "
        f"{shown_targets(config.target_modules)}"
    )


COMMAND_LINE = CommandLine(
    choices=("adapter",),
    options=(
        dataclasses.replace(RANK, help="the adapter's width, an integer >= 1"),
        DROPOUT,
        TARGETS,
    ),
    build=build,
    describe=describe,
    default_targets={"classification": ["output.dense"], "instruct": ["mlp"], "causal-lm": ["mlp"]},
    check=check,
)
