"""``lightning-peft fit --adapters NAME[=FILE],... --adapter_column COLUMN``: several adapters
trained in one run on a tiny model, written in peft's layout; the user errors are one line and
exit 2 before any work."""

from __future__ import annotations

import json

import pytest

from tests.cli.test_cli import (  # noqa: F401 (fixtures)
    QUIET,
    cli_in_process,
    models,
    snapshot,
    write_rows,
)

LANGS = ("en", "fr")


def rows(n: int = 24, langs=LANGS):
    words = ("sport", "money")
    return [
        {"text": f"{word} news item {i}", "label": word, "lang": langs[i % len(langs)]}
        for i in range(n)
        for word in words
    ]


@pytest.mark.slow
def test_two_adapters_train_on_their_rows_and_load_in_peft(tmp_path, models, cli_in_process):  # noqa: F811
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = write_rows(tmp_path / "data.jsonl", rows())
    fr_config = tmp_path / "fr" / "adapter_config.json"
    fr_config.parent.mkdir()
    fields = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["v_proj"]}
    fr_config.write_text(json.dumps(fields))
    out = tmp_path / "out"
    code, stdout, stderr = cli_in_process(
        "fit", "--model", str(models["llama"]), "--data", str(data), "--rank", "4",
        "--adapters", f"en,fr={fr_config}", "--adapter_column", "lang",
        "--output_dir", str(out), "--data.train_size=16", "--data.val_size=8",
        "--trainer.max_steps=2", "--samples=1", *QUIET,
    )  # fmt: skip
    assert code == 0, stderr[-3000:]
    assert "held-out after training" in stdout and stdout.count("    after:  ") == 1
    adapter = out / "adapter"
    for name, rank in (("en", 4), ("fr", 2)):
        saved = json.loads((adapter / name / "adapter_config.json").read_text())
        assert saved["r"] == rank
    base = AutoModelForCausalLM.from_pretrained(models["llama"])
    theirs = PeftModel.from_pretrained(base, adapter / "en", adapter_name="en")
    theirs.load_adapter(adapter / "fr", adapter_name="fr")  # both load in peft
    assert {"en", "fr"} <= set(theirs.peft_config)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--adapters", "en,fr", "--adapter_column", "topic"), "has no such column"),
        (("--adapters", "en", "--adapter_column", "lang"), "name an adapter that --adapters"),
        (("--adapters", "en,fr"), "--adapters needs --adapter_column"),
        (("--adapter_column", "lang"), "give --adapters too"),
        (("--adapters", "en,en", "--adapter_column", "lang"), "'en' is given twice"),
        (("--adapters", "e.n,fr", "--adapter_column", "lang"), "invalid adapter name 'e.n'"),
        (("--adapters", "en=missing.json,fr", "--adapter_column", "lang"), "missing.json"),
        (
            ("--method", "adapter", "--adapters", "en,fr", "--adapter_column", "lang"),
            "holds one adapter per model",
        ),
    ],
)
def test_user_errors_are_one_line_and_exit_2_before_any_work(
    tmp_path,
    models,  # noqa: F811
    cli_in_process,  # noqa: F811
    args,
    message,
):
    data = write_rows(tmp_path / "data.jsonl", rows())
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    code, _, stderr = cli_in_process(
        "fit", "--model", str(models["llama"]), "--data", str(data), "--output_dir", str(out),
        *args, *QUIET,
    )  # fmt: skip
    assert code == 2, stderr[-2000:]
    assert stderr.startswith("lightning-peft: error: ") and stderr.count("\n") == 1, stderr
    assert message in stderr
    assert snapshot(tmp_path) == before
