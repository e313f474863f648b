"""``IA3Config``: peft's field names and defaults (``peft.IA3Config``)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning_peft.core.config import (
    check_adapter_dtype,
    check_modules_to_save,
    check_peft_type,
    check_target_names,
    check_task_type,
    with_task_heads,
)

# peft ``IA3Config`` fields that do not change the adapted model: accepted, kept as given, not
# compared, left out of ``to_dict()`` (peft decides ``fan_in_fan_out`` from the layer type, too).
IA3_PEFT_INERT_FIELDS = (
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "fan_in_fan_out",
)


def feedforward_match(feedforward: list[str] | str | None, name: str) -> bool:
    """peft's ``_check_target_module_feedforward``: a string full-matches, a list entry is a
    plain suffix of the name."""
    if not feedforward:
        return False
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, name) is not None
    return any(name.endswith(entry) for entry in feedforward)


@dataclass
class IA3Config:
    """(IA)³ configuration with peft's field names and defaults (``peft.IA3Config``).

    ``IA3Config(**peft.IA3Config(...).to_dict())`` works: every other field of peft's config is
    in ``IA3_PEFT_INERT_FIELDS`` (accepted, no effect on the model).

    Args:
        target_modules: as ``LoRAConfig``'s (names, a full-match regex, or ``"all-linear"``);
            required (peft would fill it from a per-architecture table).
        exclude_modules: names or a regex never adapted.
        feedforward_modules: the targets whose input is scaled rather than their output (the
            paper's second feed-forward layer, e.g. ``["down_proj"]``). peft's rule: a regex
            string must match the whole name; a list entry matches any name that ends with it
            (no dot needed). A list must be a subset of a ``target_modules`` list, as in peft.
            ``None``: no target is feed-forward (peft would fill ``None`` from its
            per-architecture table: name them to get peft's choice).
        modules_to_save: modules trained and saved in full.
        init_ia3_weights: ``True`` starts every vector at 1 (the adapted model equals the base);
            ``False`` draws them from N(0, 1) (tests).
        task_type: as ``LoRAConfig``'s (``"SEQ_CLS"`` trains the ``classifier``/``score`` head
            in full, ...).
        adapter_dtype: the dtype of the vectors (default float32).
    """

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True
    task_type: str | None = None
    adapter_dtype: str = "float32"
    peft_type: Any = field(default="IA3", repr=False, compare=False)
    auto_mapping: Any = field(default=None, repr=False, compare=False)
    peft_version: Any = field(default=None, repr=False, compare=False)
    base_model_name_or_path: Any = field(default=None, repr=False, compare=False)
    revision: Any = field(default=None, repr=False, compare=False)
    inference_mode: Any = field(default=False, repr=False, compare=False)
    fan_in_fan_out: Any = field(default=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_peft_type(self.peft_type, "IA3", "an IA3Config")
        self.task_type = check_task_type(self.task_type)
        self.modules_to_save = with_task_heads(self.modules_to_save, self.task_type)
        self.target_modules = check_target_names("target_modules", self.target_modules, False)
        self.exclude_modules = check_target_names("exclude_modules", self.exclude_modules, True)
        if (
            isinstance(self.feedforward_modules, (list, tuple, set))
            and not self.feedforward_modules
        ):
            self.feedforward_modules = []  # none (peft's files say [] rather than None)
        else:
            self.feedforward_modules = check_target_names(
                "feedforward_modules", self.feedforward_modules, True
            )
        self.modules_to_save = check_modules_to_save(self.modules_to_save)
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            outside = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if outside:
                raise ValueError(
                    f"feedforward_modules must be a subset of target_modules (as in peft): "
                    f"{outside[0]!r} is not in target_modules={self.target_modules!r}"
                )
        if not isinstance(self.init_ia3_weights, bool):
            raise ValueError(
                f"init_ia3_weights must be True or False, got {self.init_ia3_weights!r}"
            )
        check_adapter_dtype(self.adapter_dtype)

    def is_feedforward(self, name: str) -> bool:
        """Whether the target ``name`` has its input scaled (peft's rule, see the class doc)."""
        return feedforward_match(self.feedforward_modules, name)

    def to_dict(self) -> dict[str, Any]:
        """The fields that define the adapters (peft's inert fields left out)."""
        return {k: v for k, v in asdict(self).items() if k not in IA3_PEFT_INERT_FIELDS}
