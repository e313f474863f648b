"""What a method declares for the ``lightning-peft`` command: its ``--method`` names, its options
(each with a type, a default, a help text and a check), its default targets and learning rate per
task, how it builds its config from the options and how it describes that config in one line.

The command (``lightning_peft.cli``) loops over the registered methods' ``CommandLine``s: it adds
each option once, refuses an option the chosen method does not take, and asks the method for the
rest. Nothing here imports the command's parser (jsonargparse, Lightning).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lightning_peft.core.config import ALL_LINEAR, is_positive_int
from lightning_peft.core.errors import InputError

REGEX_PREFIX = "re:"


@dataclass(frozen=True)
class Option:
    """One command-line option ``--name``.

    Args:
        name: the parser's name (``--name``).
        type: the parser's type.
        help: what it means for this method (the command joins the methods' texts).
        default: the value when it is not given (None: no default).
        check: ``value -> None`` for a given value; raises ``InputError`` (one line).
        parse: ``value -> value`` for a given value, after ``check`` (e.g. ``--targets``' text
            as ``target_modules``); raises ``InputError``.
    """

    name: str
    type: Any
    help: str
    default: Any = None
    check: Callable[[Any], None] | None = None
    parse: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class OptionValues:
    """The options given on the command line (``given``: name -> parsed value, never None) and
    the defaults of the chosen method's options (``targets``: the task's default targets)."""

    given: Mapping[str, Any]
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.given.get(name, self.defaults.get(name))

    def __contains__(self, name: str) -> bool:
        return name in self.given


@dataclass(frozen=True)
class CommandLine:
    """A method on the command line.

    Args:
        choices: its ``--method`` names (LoRA: ``lora`` and ``dora``).
        options: the options it takes, in the order they are checked and listed.
        build: ``(choice, values, task, model_path) -> config``; raises ``InputError`` or the
            config's own ``ValueError``.
        describe: ``config -> str``, what the run adapts ("LoRA r=16 on all-linear").
        default_targets: task -> ``target_modules`` when ``--targets`` is not given.
        lr: AdamW's learning rate when ``--model.lr`` is not given (None: the task's).
        check: ``(choice, values) -> None``, checks across options; raises ``InputError``.
        check_plan: ``(config, targets, values) -> None`` once the targets are planned on the
            model; raises ``InputError``.
        target_option: how a targeting error names what chose the targets.
    """

    choices: tuple[str, ...]
    options: tuple[Option, ...]
    build: Callable[[str, OptionValues, str, str | None], Any]
    describe: Callable[[Any], str]
    default_targets: Mapping[str, Any] = field(default_factory=dict)
    lr: float | None = None
    check: Callable[[str, OptionValues], None] | None = None
    check_plan: Callable[[Any, list[str], OptionValues], None] | None = None
    target_option: str = "--targets"

    def option(self, name: str) -> Option | None:
        return next((o for o in self.options if o.name == name), None)


# -- values -------------------------------------------------------------------------------------


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


def shown_targets(targets: list[str] | str) -> str:
    """``target_modules`` as the command line writes it."""
    if isinstance(targets, list):
        return ",".join(targets)
    return targets if targets == ALL_LINEAR else f"re:{targets}"


def _check_rank(value: Any) -> None:
    if not is_positive_int(value):
        raise InputError(f"--rank must be an integer >= 1, got {value!r}")


def _check_dropout(value: Any) -> None:
    if not 0.0 <= value < 1.0:
        raise InputError(f"--dropout must be in [0, 1), got {value!r}")


def _check_alpha(value: Any) -> None:
    if not math.isfinite(value) or value <= 0:
        raise InputError(f"--alpha must be a positive number, got {value!r}")


# The options several methods share; a method may declare its own help text with
# ``dataclasses.replace(RANK, help=...)``.
RANK = Option("rank", int, "an integer >= 1", default=16, check=_check_rank)
ALPHA = Option("alpha", float, "alpha, the update's scale is alpha/rank", 32.0, _check_alpha)
DROPOUT = Option("dropout", float, "dropout, in [0, 1)", default=0.05, check=_check_dropout)
TARGETS = Option("targets", list[str] | str | None, "what to adapt", parse=parse_targets)
