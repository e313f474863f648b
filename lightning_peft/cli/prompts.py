"""Instruction prompts that ask a causal LM for a text's label, and their answers as tokens.

One example is ``prompt + answer``:

- prompt: the tokenizer's chat template around the user turn ``instruction`` (its ``{labels}``
  and ``{text}`` filled in; without a chat template, the instruction and a newline), then the
  start of the assistant's answer, ``answer_prefix`` (e.g. ``"Topic:"``);
- answer: ``" " + label`` and the end-of-turn token (the tokenizer's EOS).

The training labels are -100 on the prompt (and on padding), so the loss is on the answer only.
The text is cut (in tokens) so that the whole example fits ``max_length``. The held-out
accuracy is the model's choice among the labels at the first answer token, so the labels must
start with different tokens (refused by name otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_peft.core.errors import InputError


@dataclass(frozen=True)
class PromptFormat:
    instruction: str
    answer_prefix: str


BBC_PROMPT = PromptFormat(
    "Which topic is this BBC News article about: {labels}?\n\n{text}", "Topic:"
)
GENERIC_PROMPT = PromptFormat("Which label fits this text best: {labels}?\n\n{text}", "Answer:")


def default_prompt(bbc: bool) -> PromptFormat:
    return BBC_PROMPT if bbc else GENERIC_PROMPT


def _spoken_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


class LabelPrompt:
    """Builds the token ids of instruct examples for one tokenizer and one label set.

    Args:
        tokenizer: a transformers tokenizer.
        labels: the label names (answers).
        instruction: the user turn, with the placeholders ``{text}`` and, optionally,
            ``{labels}`` (the labels as "a, b or c").
        answer_prefix: the start of the assistant's turn, before the label.
        max_length: tokens per example; the text is cut to fit.

    Raises:
        InputError: no ``{text}`` placeholder, labels that start with the same token, or a
            ``max_length`` that leaves fewer than 8 tokens of text.
    """

    MIN_TEXT_TOKENS = 8

    def __init__(
        self,
        tokenizer,
        labels: list[str],
        *,
        instruction: str,
        answer_prefix: str,
        max_length: int,
    ) -> None:
        if "{text}" not in instruction:
            raise InputError(f"--data.instruction must contain {{text}}, got {instruction!r}")
        self.tokenizer, self.labels = tokenizer, list(labels)
        self.instruction, self.answer_prefix = instruction, answer_prefix
        end = tokenizer.eos_token_id  # the end of the turn (SmolLM2: <|im_end|>)
        end = end if end is not None else tokenizer.sep_token_id
        space = " " if answer_prefix and not answer_prefix[-1].isspace() else ""
        self.answers = {
            label: self._ids(space + label) + ([end] if end is not None else [])
            for label in self.labels
        }
        firsts: dict[int, str] = {}
        for label in self.labels:
            first = self.answers[label][0]
            if first in firsts:
                raise InputError(
                    f"the labels {firsts[first]!r} and {label!r} start with the same token "
                    f"{tokenizer.convert_ids_to_tokens(first)!r}; the instruct task scores the "
                    "first answer token: rename them, or use --task classification"
                )
            firsts[first] = label
        self.choice_token_ids = [self.answers[label][0] for label in self.labels]
        self.max_length = max_length
        self.answer_tokens = max(len(a) for a in self.answers.values())
        overhead = len(self._prompt_ids("")) + self.answer_tokens
        self.text_tokens = max_length - overhead
        if self.text_tokens < self.MIN_TEXT_TOKENS:
            raise InputError(
                f"--data.max_length {max_length} leaves {self.text_tokens} tokens of text: the "
                f"instruction and answer take {overhead}; raise it"
            )

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _prompt_ids(self, text: str) -> list[int]:
        labels = _spoken_list(self.labels)
        content = self.instruction.replace("{labels}", labels).replace("{text}", text)
        if getattr(self.tokenizer, "chat_template", None):
            chat = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
        else:
            chat = content + "\n"
        return self._ids(chat + self.answer_prefix)

    def prompt_ids(self, text: str) -> list[int]:
        """The prompt for ``text``, its text cut so that prompt and the longest answer fit
        ``max_length``: the input of generation, and the first part of an example. (Decoding
        the cut tokens and encoding them inside the prompt can merge differently: the cut is
        shortened until the whole fits.)"""
        text = text.strip()
        ids, budget = self._ids(text), self.text_tokens
        while True:
            cut = text if len(ids) <= budget else self.tokenizer.decode(ids[:budget]).strip()
            prompt = self._prompt_ids(cut)
            excess = len(prompt) + self.answer_tokens - self.max_length
            if excess <= 0 or budget <= 1:
                return prompt
            budget -= excess

    def example(self, text: str, label: str) -> dict[str, list[int]]:
        """``input_ids`` = prompt + answer; ``labels`` = -100 on the prompt, the answer's ids."""
        prompt, answer = self.prompt_ids(text), self.answers[label]
        return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}
