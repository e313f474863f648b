"""Name matching shared by the methods and targeting (peft's rules)."""

from __future__ import annotations

import re


def name_matches(targets: list[str] | str | None, name: str) -> bool:
    """peft's rule: a regex string must match the whole name; a list entry the name or a suffix."""
    if not targets:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith(f".{target}") for target in targets)


def named_in_full(targets: list[str] | str | None, name: str) -> bool:
    """Whether a target list names ``name`` whole (not as a suffix; a string never does)."""
    return bool(targets) and not isinstance(targets, str) and name in targets


def inside_modules_to_save(modules_to_save: list[str] | None, name: str) -> bool:
    return bool(modules_to_save) and any(
        re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in modules_to_save
    )


def layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    """The first layer index in ``name`` (``...layers.3.self_attn...`` -> 3), as peft reads it."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", name)
            if match:
                break
    return int(match.group(1)) if match else None
