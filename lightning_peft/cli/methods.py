"""The method options of ``lightning-peft fit`` and the adapter config they build.

``--method`` takes the ``--method`` names of the registered methods that declare a
``CommandLine`` (``lightning_peft.core.command_line``; LoRA's are ``lora`` and ``dora``). Each
takes its own options; one given to a method that does not take it is refused by name. The
options default to None ("not given"), so that refusal can tell a value the user wrote from a
default; the method's option defaults fill the ones it takes. Default targets, learning rates
and the one-line description come from the method too: this module never names a method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lightning_peft.core.adapter import AdapterConfigLike, Method
from lightning_peft.core.command_line import (
    CommandLine,
    Option,
    OptionValues,
    parse_names,
    parse_targets,
)
from lightning_peft.core.errors import InputError
from lightning_peft.methods.registry import METHODS

__all__ = [
    "MethodOptions",
    "build_peft_config",
    "command_line_for",
    "describe",
    "method_choices",
    "method_lr",
    "method_options",
    "option_specs",
    "parse_names",
    "parse_targets",
    "targets_help",
]


def _on_command_line() -> list[tuple[Method, CommandLine]]:
    return [(m, m.command_line) for m in METHODS if m.command_line is not None]


def method_choices() -> tuple[str, ...]:
    """Every ``--method`` name, in the registry's order (a registered method without a
    command line keeps its name: it is refused as not available yet)."""
    names: list[str] = []
    for method in METHODS:
        names.extend(method.command_line.choices if method.command_line else (method.name,))
    return tuple(names)


def command_line_for(choice: str) -> CommandLine | None:
    return next((cl for _, cl in _on_command_line() if choice in cl.choices), None)


def method_options() -> dict[str, tuple[str, ...]]:
    """``--method`` name -> the options it takes (by the parser's names)."""
    return {
        choice: tuple(o.name for o in cl.options)
        for _, cl in _on_command_line()
        for choice in cl.choices
    }


def method_lr() -> dict[str, float]:
    """``--method`` name -> AdamW's learning rate when ``--model.lr`` is not given, for the
    methods that have their own (others: the task's)."""
    return {c: cl.lr for _, cl in _on_command_line() if cl.lr is not None for c in cl.choices}


def option_specs() -> dict[str, list[tuple[tuple[str, ...], Option]]]:
    """Option name -> the methods' declarations of it ((their ``--method`` names, option)), in
    the registry's order: the parser adds each option once."""
    specs: dict[str, list[tuple[tuple[str, ...], Option]]] = {}
    for _, cl in _on_command_line():
        for option in cl.options:
            specs.setdefault(option.name, []).append((cl.choices, option))
    return specs


def _shown(targets: list[str] | str) -> str:
    if isinstance(targets, list):
        return ",".join(targets)
    return targets


def targets_help() -> str:
    """``--targets``' help, with each method's default targets per task."""
    defaults = []
    for _, cl in _on_command_line():
        if cl.option("targets") is None or not cl.default_targets:
            continue
        by_task = "; ".join(f"{task}: {_shown(t)}" for task, t in cl.default_targets.items())
        defaults.append(f"{'/'.join(cl.choices)}: {by_task}")
    return (
        "what to adapt: NAME or NAME,NAME,... (a module matches when its name is NAME or ends in "
        "'.NAME', as peft's lists); all-linear (every linear layer but the output layer); "
        "re:REGEX (a regular expression that must match a module's whole name, e.g. "
        "'re:.*layers\\.[0-3]\\..*_proj'). Defaults: " + " | ".join(defaults)
    )


@dataclass
class MethodOptions:
    """The method options as given on the command line (None: not given)."""

    method: str = "lora"
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_namespace(cls, config: Any) -> MethodOptions:
        return cls(config.get("method"), {name: config.get(name) for name in option_specs()})

    def given(self) -> list[str]:
        """The options given (not None), in the parser's order."""
        return [name for name in option_specs() if self.options.get(name) is not None]

    def _command_line(self) -> CommandLine:
        method = self.method
        if method not in method_choices():
            raise InputError(
                f"unknown method {method!r}; choose one of {', '.join(method_choices())}"
            )
        command_line = command_line_for(method)
        if command_line is None:  # a registered method this command cannot build
            raise InputError(f"--method {method} is not available on the command line yet")
        return command_line

    def values(self) -> OptionValues:
        """Every problem the options have without a model: an unknown method, an option the
        method does not take, a value out of range or unparsable; then the parsed values.

        Raises:
            InputError: one line naming the option.
        """
        command_line = self._command_line()
        takes = [o.name for o in command_line.options]
        for name in self.given():
            if name not in takes:
                raise InputError(
                    f"--{name} does not apply to --method {self.method} (it takes "
                    f"{', '.join(f'--{o}' for o in takes)})"
                )
        given = {}
        for option in command_line.options:
            value = self.options.get(option.name)
            if value is None:
                continue
            if option.check is not None:
                option.check(value)
            given[option.name] = option.parse(value) if option.parse is not None else value
        values = OptionValues(given, {o.name: o.default for o in command_line.options})
        if command_line.check is not None:
            command_line.check(self.method, values)
        return values

    def check(self) -> None:
        """``values()``' checks (see there)."""
        self.values()

    def build(self, task: str = "instruct", model_path: str | None = None) -> AdapterConfigLike:
        """The adapter config (after ``check``); ``model_path``: the tokenizer of an option that
        reads one (``--prompt_init``).

        Raises:
            InputError: the options' problems (``check``), or the config's own refusal.
        """
        values = self.values()
        command_line = self._command_line()
        defaults = dict(values.defaults)
        if command_line.option("targets") is not None:
            defaults["targets"] = command_line.default_targets[task]
        values = OptionValues(values.given, defaults)
        try:
            return command_line.build(self.method, values, task, model_path)
        except InputError:
            raise
        except ValueError as error:  # what the config itself refuses, on one line
            raise InputError(f"--method {self.method}: {' '.join(str(error).split())}") from None


def build_peft_config(
    method: str,
    task: str = "instruct",
    model_path: str | None = None,
    **options: Any,
) -> AdapterConfigLike:
    """The adapter config of the command-line options (the methods' option names; None or
    missing: not given); every problem is an ``InputError``."""
    return MethodOptions(method, options).build(task, model_path)


def describe(method: str, config: Any) -> str:
    """What the run adapts, for the command's first line (e.g. "LoRA r=16 on all-linear")."""
    command_line = command_line_for(method)
    return command_line.describe(config) if command_line is not None else method
