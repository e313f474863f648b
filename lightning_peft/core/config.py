"""Checks shared by the methods' configs: target lists, ``bias``, ``adapter_dtype``, task heads."""

from __future__ import annotations

import re
from typing import Any

ALL_LINEAR = "all-linear"


BIAS_CHOICES = ("none", "all", "lora_only")


# task_type -> modules trained in full, as peft's task models add them to modules_to_save.
TASK_HEADS = {
    "SEQ_CLS": ["classifier", "score"],
    "TOKEN_CLS": ["classifier", "score"],
    "QUESTION_ANS": ["qa_outputs"],
    "CAUSAL_LM": [],
    "SEQ_2_SEQ_LM": [],
    "FEATURE_EXTRACTION": [],
}


def check_target_names(name: str, value: Any, allow_none: bool) -> list[str] | str | None:
    """A list/tuple/set of names becomes a sorted list; a string must be a valid regex."""
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{name} is required: a list of module names, a regex, or 'all-linear'")
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(
                f"{name}={value!r} is not a valid regular expression: {error}"
            ) from None
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        if not value:
            raise ValueError(f"{name} must not be empty")
        return sorted(set(value))
    raise ValueError(f"{name} must be a list of module names or a regex string, got {value!r}")


DTYPE_CHOICES = ("float32", "float64", "bfloat16", "float16")


def is_positive_int(value: Any) -> bool:
    """Whether ``value`` is an ``int`` >= 1 (``True`` is not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_peft_type(peft_type: Any, expected: str, config_name: str) -> None:
    """A peft ``peft_type`` field (a string or peft's enum) must be ``expected``."""
    if str(getattr(peft_type, "value", peft_type)) != expected:
        raise ValueError(f"peft_type={peft_type!r}: {config_name} describes {expected} adapters")


def with_task_heads(modules_to_save: list[str] | None, task_type: str | None) -> list[str] | None:
    """``modules_to_save`` plus ``task_type``'s heads (``TASK_HEADS``), as peft's task models add
    them, before any module is matched."""
    heads = TASK_HEADS[task_type] if task_type else []
    return [*(modules_to_save or []), *heads] if heads else modules_to_save


def check_modules_to_save(modules_to_save: Any) -> list[str] | None:
    """``modules_to_save`` as a sorted list of names (None stays None)."""
    if modules_to_save is None:
        return None
    return check_target_names("modules_to_save", list(modules_to_save), False)


def check_adapter_dtype(adapter_dtype: Any) -> None:
    if adapter_dtype not in DTYPE_CHOICES:
        raise ValueError(f"adapter_dtype must be one of {DTYPE_CHOICES}, got {adapter_dtype!r}")


def check_shared_fields(config: Any, targets_optional: bool = False) -> None:
    """Checks of the fields both configs have; normalises the target lists.
    ``targets_optional``: ``target_modules`` may be None or empty (LoRA with
    ``target_parameters``); it becomes ``[]`` then."""
    if targets_optional and config.target_modules in (None, [], (), set(), frozenset()):
        config.target_modules = []
    else:
        config.target_modules = check_target_names("target_modules", config.target_modules, False)
    config.exclude_modules = check_target_names("exclude_modules", config.exclude_modules, True)
    config.modules_to_save = check_modules_to_save(config.modules_to_save)
    if config.bias not in BIAS_CHOICES:
        raise ValueError(f"bias must be one of {BIAS_CHOICES}, got {config.bias!r}")
    check_adapter_dtype(config.adapter_dtype)


def check_task_type(task_type: Any) -> str | None:
    if task_type is None:
        return None
    task_type = str(getattr(task_type, "value", task_type))
    if task_type not in TASK_HEADS:
        raise ValueError(f"task_type must be None or one of {tuple(TASK_HEADS)}, got {task_type!r}")
    return task_type
