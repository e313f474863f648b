"""LoRA and DoRA on the command line (``--method lora`` / ``--method dora``): all-linear for the
LLM tasks; the attention query/value projections of the usual encoder families for classification
(names absent from a model are simply not matched)."""

from __future__ import annotations

import dataclasses

from lightning_peft.core.command_line import (
    ALPHA,
    DROPOUT,
    RANK,
    TARGETS,
    CommandLine,
    OptionValues,
    shown_targets,
)
from lightning_peft.core.config import ALL_LINEAR
from lightning_peft.methods.lora.config import LoRAConfig

DORA = "dora"  # LoRA with DoRA's magnitude (use_dora=True)


def build(choice: str, values: OptionValues, task: str, model_path: str | None) -> LoRAConfig:
    return LoRAConfig(
        r=values["rank"],
        lora_alpha=values["alpha"],
        target_modules=values["targets"],
        lora_dropout=values["dropout"],
        use_dora=choice == DORA,
    )


def describe(config: LoRAConfig) -> str:
    kind = "DoRA" if config.use_dora else "LoRA"
    return f"{kind} r={config.r} on {shown_targets(config.target_modules)}"


COMMAND_LINE = CommandLine(
    choices=("lora", DORA),
    options=(
        dataclasses.replace(RANK, help="rank, an integer >= 1"),
        ALPHA,
        DROPOUT,
        TARGETS,
    ),
    build=build,
    describe=describe,
    default_targets={
        "classification": ["query", "value", "q_proj", "v_proj", "c_attn"],
        "instruct": ALL_LINEAR,
        "causal-lm": ALL_LINEAR,
    },
)
