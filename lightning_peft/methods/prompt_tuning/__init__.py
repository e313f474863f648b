"""Prompt tuning: the config (``config``), the prompt layer and its hooks, and the registered
method (``layers``)."""

from lightning_peft.methods.prompt_tuning.config import PromptTuningConfig
from lightning_peft.methods.prompt_tuning.layers import PROMPT_TUNING, PromptEmbedding

__all__ = ["PROMPT_TUNING", "PromptEmbedding", "PromptTuningConfig"]
