"""The package's layers: the import-linter contracts hold, the layers below ``lightning`` import
without Lightning, and ``lightning_peft``'s public names load lazily."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports() -> str | None:
    local = Path(sys.executable).with_name("lint-imports")
    return str(local) if local.exists() else shutil.which("lint-imports")


def test_layers_contract_holds():
    lint_imports = _lint_imports()
    if lint_imports is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    run = subprocess.run(
        [lint_imports, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


def test_lower_layers_import_without_lightning():
    code = (
        "import sys\n"
        "sys.modules['lightning'] = None\n"
        "sys.modules['pytorch_lightning'] = None\n"
        "import lightning_peft.core, lightning_peft.methods, lightning_peft.model\n"
        "import lightning_peft.peft_format\n"
        "import lightning_peft\n"
        "from lightning_peft import LoRAConfig, inject_adapters, save_adapter\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
        "try:\n"
        "    lightning_peft.PEFTCallback\n"
        "except ImportError:\n"
        "    print('callback needs lightning')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "callback needs lightning"


def test_public_names_load_lazily():
    import lightning_peft

    assert sorted(lightning_peft.__all__) == sorted(lightning_peft._EXPORTS)
    for name in lightning_peft.__all__:
        assert getattr(lightning_peft, name) is not None
    assert set(lightning_peft.__all__) <= set(dir(lightning_peft))
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        lightning_peft.nothing_here  # noqa: B018
