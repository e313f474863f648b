"""``PromptTuningConfig``: peft's field names and defaults (``peft.PromptTuningConfig``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lightning_peft.core.config import (
    TASK_HEADS,
    check_adapter_dtype,
    check_modules_to_save,
    check_peft_type,
    is_positive_int,
    with_task_heads,
)

PROMPT_INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")


PROMPT_TASKS = ("CAUSAL_LM", "SEQ_CLS", "FEATURE_EXTRACTION")


# peft ``PromptTuningConfig`` fields that do not change the adapted model (metadata; the
# attention heads and layers are only read by prefix tuning): accepted, not compared.
PROMPT_PEFT_INERT_FIELDS = (
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "num_attention_heads",
    "num_layers",
)


def _enum_value(value: Any) -> Any:
    return getattr(value, "value", value)


def check_tokenizer_directory(path: str) -> Path:
    """``path`` as a local directory, or a ``ValueError``: nothing is ever downloaded."""
    directory = Path(path)
    if not directory.is_dir():
        raise ValueError(
            f"tokenizer_name_or_path={path!r} is not a local directory; this package never "
            "downloads a tokenizer: save the model's tokenizer with tokenizer.save_pretrained(dir) "
            "and pass that directory"
        )
    return directory


@dataclass
class PromptTuningConfig:
    """Prompt tuning with peft's field names (``peft.PromptTuningConfig``).

    Args:
        num_virtual_tokens: n, the number of virtual tokens (>= 1).
        task_type: ``"CAUSAL_LM"`` (labels extended with -100), ``"SEQ_CLS"`` (the
            ``classifier``/``score`` head trains in full; ``token_type_ids`` extended with 0) or
            ``"FEATURE_EXTRACTION"`` (a bare encoder/decoder). Required: it decides how the
            inputs are extended (peft's task-less ``PeftModel`` would not prepend the prompt at
            all).
        prompt_tuning_init: ``"RANDOM"`` (P ~ N(0, 1), peft's default), ``"TEXT"`` (the input
            embeddings of ``prompt_tuning_init_text``'s tokens, cut or repeated to n) or
            ``"SAMPLE_VOCAB"`` (the embeddings of n random token ids).
        prompt_tuning_init_text: the text for ``"TEXT"``.
        tokenizer_name_or_path: for ``"TEXT"``: a local directory holding the model's tokenizer
            (``tokenizer.save_pretrained(dir)``). Nothing is downloaded: a hub name is refused.
        tokenizer_kwargs: extra arguments of ``AutoTokenizer.from_pretrained`` (``"TEXT"`` only;
            ``trust_remote_code`` is refused).
        modules_to_save: modules trained and saved in full.
        token_dim: d; by default the input embedding's width (a different value is refused).
        num_transformer_submodules: 1 (encoder-decoder models, peft's 2, are not supported).
        adapter_dtype: the dtype of P (default float32).
        inference_mode: as peft's: the weights will be loaded, so the init is skipped (P is
            drawn at random). Saved directories say ``true``.
    """

    num_virtual_tokens: int | None = None
    task_type: str | None = None
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None
    modules_to_save: list[str] | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    adapter_dtype: str = "float32"
    inference_mode: bool = field(default=False, repr=False, compare=False)
    peft_type: Any = field(default="PROMPT_TUNING", repr=False, compare=False)
    auto_mapping: Any = field(default=None, repr=False, compare=False)
    peft_version: Any = field(default=None, repr=False, compare=False)
    base_model_name_or_path: Any = field(default=None, repr=False, compare=False)
    revision: Any = field(default=None, repr=False, compare=False)
    num_attention_heads: Any = field(default=None, repr=False, compare=False)
    num_layers: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_peft_type(self.peft_type, "PROMPT_TUNING", "a PromptTuningConfig")
        if not is_positive_int(self.num_virtual_tokens):
            raise ValueError(
                f"num_virtual_tokens must be an integer >= 1, got {self.num_virtual_tokens!r}"
            )
        self.task_type = _enum_value(self.task_type)
        if self.task_type not in PROMPT_TASKS:
            raise ValueError(
                f"task_type must be one of {PROMPT_TASKS} for prompt tuning (it decides how "
                f"labels and masks are extended), got {self.task_type!r}"
                + (
                    ": peft's prompt tuning for that task does not fit here (encoder-decoder "
                    "models, or per-token labels peft does not extend)"
                    if self.task_type in TASK_HEADS
                    else ""
                )
            )
        self.modules_to_save = check_modules_to_save(
            with_task_heads(self.modules_to_save, self.task_type)
        )
        self.prompt_tuning_init = str(_enum_value(self.prompt_tuning_init))
        if self.prompt_tuning_init not in PROMPT_INITS:
            raise ValueError(
                f"prompt_tuning_init must be one of {PROMPT_INITS}, got {self.prompt_tuning_init!r}"
            )
        self._check_text_init()
        if self.token_dim is not None and not is_positive_int(self.token_dim):
            raise ValueError(f"token_dim must be None or an integer >= 1, got {self.token_dim!r}")
        if self.num_transformer_submodules not in (None, 1):
            raise ValueError(
                f"num_transformer_submodules={self.num_transformer_submodules!r}: only 1 is "
                "supported (2 is peft's encoder-decoder prompt tuning)"
            )
        check_adapter_dtype(self.adapter_dtype)

    def _check_text_init(self) -> None:
        text_init = self.prompt_tuning_init == "TEXT"
        if self.tokenizer_kwargs and not text_init:
            raise ValueError("tokenizer_kwargs are only used with prompt_tuning_init='TEXT'")
        if self.tokenizer_kwargs and self.tokenizer_kwargs.get("trust_remote_code"):
            raise ValueError(
                "tokenizer_kwargs: trust_remote_code is not allowed (it would run code from the "
                "tokenizer's directory; peft drops it too)"
            )
        if not text_init:
            return
        if not isinstance(self.prompt_tuning_init_text, str) or not self.prompt_tuning_init_text:
            raise ValueError("prompt_tuning_init='TEXT' needs a prompt_tuning_init_text")
        if not self.tokenizer_name_or_path:
            raise ValueError("prompt_tuning_init='TEXT' needs tokenizer_name_or_path")
        if not self.inference_mode:  # a loaded adapter's init never runs
            check_tokenizer_directory(self.tokenizer_name_or_path)

    def to_dict(self) -> dict[str, Any]:
        """The fields that define the adapter (peft's inert fields left out)."""
        skip = {*PROMPT_PEFT_INERT_FIELDS, "inference_mode"}
        return {k: v for k, v in asdict(self).items() if k not in skip}
