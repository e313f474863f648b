"""The installed program, run as a user runs it: from a directory outside the checkout.

From the repository root, Python finds ``lightning_peft`` and ``peft_kernels`` in the current
directory whatever is installed, so an import that works only there (a module left out of the
wheel, a top-level name that another distribution owns) passes every in-tree test. Here:

- the wheel (``pip wheel . --no-deps``) holds ``lightning_peft``, ``peft_kernels`` and its
  ``.dist-info``, nothing else at the top level;
- installed into a fresh virtual environment beside the locked dependencies (this environment's
  site-packages, appended by a ``.pth`` line, which does not process the editable install's
  hooks there), its console script and imports run from ``tmp_path``;
- every entry point the README names runs from ``tmp_path`` in this environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(args: list[str | Path], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """A child process in ``cwd`` with a plain environment (no PYTHONPATH), offline."""
    child_env = {
        "PATH": f"{BIN}:/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/root"),
        "HF_HUB_OFFLINE": "1",
        "LIGHTNING_PEFT_THREADS": "1",
        **env,
    }
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=child_env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{args} failed in {cwd}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _run(
        [sys.executable, "-m", "pip", "wheel", REPO, "--no-deps", "--no-build-isolation", "-q",
         "-w", out],
        cwd=out,
    )  # fmt: skip
    (path,) = out.glob("lightning_peft-*.whl")
    return path


def test_the_wheel_holds_our_two_packages_and_nothing_else_at_the_top_level(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    dist_info = {t for t in top_level if t.endswith(".dist-info")}
    assert top_level - dist_info == {"lightning_peft", "peft_kernels"}, sorted(top_level)
    assert not any(name.startswith(("kernels/", "benchmarks/", "tests/")) for name in names)
    # the subpackages come along (a missing __init__ or package pattern drops them silently)
    assert "lightning_peft/methods/lora/linear.py" in names and "peft_kernels/ops.py" in names


@pytest.mark.slow
def test_the_wheel_installed_beside_the_locked_dependencies_runs_from_outside(wheel, tmp_path):
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    # The locked dependencies: this environment's site-packages, after the new one's own.
    (site / "locked_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
          "--no-index", wheel], cwd=tmp_path)  # fmt: skip

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    script = env_dir / "bin" / "lightning-peft"
    assert "fit" in _run([script, "--help"], cwd=outside).stdout
    assert "--method" in _run([script, "fit", "--help"], cwd=outside).stdout
    where = _run(
        [python, "-c",
         "import kernels, lightning_peft, peft_kernels\n"
         "print(lightning_peft.__file__); print(peft_kernels.__file__); print(kernels.__file__)"],
        cwd=outside,
    ).stdout.split()  # fmt: skip
    ours, kernels_ours, hugging_face = (Path(p) for p in where)
    assert ours.is_relative_to(site) and kernels_ours.is_relative_to(site), where  # the wheel's
    assert hugging_face.parent.name == "kernels" and "site-packages" in hugging_face.parts, where


def test_hugging_face_kernels_and_ours_share_one_environment(tmp_path):
    """transformers >= 5.25 requires Hugging Face's ``kernels`` (import name ``kernels``) and
    ``from_pretrained`` imports it; ours is ``peft_kernels``. Both import in one process, from
    outside the checkout, and each is what it claims to be."""
    code = (
        "import kernels, peft_kernels, lightning_peft\n"
        "from kernels import Mode, get_kernel, kernelize\n"  # what transformers/bitsandbytes use
        "from peft_kernels import lora_linear, dora_linear\n"
        "import torch\n"
        "x, w = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)\n"
        "a, b = torch.randn(2, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)\n"
        "y = lora_linear(x, w, None, a, b, 0.5)\n"
        "torch.testing.assert_close(y, x @ w.T + 0.5 * x @ a.T @ b.T)\n"
        "print(kernels.__file__)\n"
    )
    where = Path(_run([sys.executable, "-c", code], cwd=tmp_path).stdout.strip())
    assert where.parent.name == "kernels" and "site-packages" in where.parts, where


# -- every entry point the README names, from outside the checkout -------------------------------

ENTRY_POINTS = {
    "lightning-peft --help": (["lightning-peft", "--help"], "fit"),
    "lightning-peft fit --help": (["lightning-peft", "fit", "--help"], "--targets"),
    "lightning-peft inspect --help": (["lightning-peft", "inspect", "--help"], "usage"),
}


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_the_installed_entry_points_run_from_outside_the_checkout(name, tmp_path):
    args, expected = ENTRY_POINTS[name]
    assert expected in _run([BIN / args[0], *args[1:]], cwd=tmp_path).stdout


@pytest.mark.parametrize(
    "module, subcommand",
    [("benchmarks", []), ("benchmarks", ["model"]), ("benchmarks", ["qlora"]),
     ("benchmarks", ["profile"]), ("benchmarks.finite_check", [])],
)  # fmt: skip
def test_the_benchmarks_run_from_outside_the_checkout(module, subcommand, tmp_path):
    """``python -m benchmarks`` is a folder of the repository, not of the wheel: run it with only
    that folder on the path, so that it imports lightning-peft as installed and nothing else
    from the checkout's root."""
    only_benchmarks = tmp_path / "path"
    only_benchmarks.mkdir()
    (only_benchmarks / "benchmarks").symlink_to(REPO / "benchmarks")
    result = _run(
        [sys.executable, "-m", module, *subcommand, "--help"],
        cwd=tmp_path,
        PYTHONPATH=str(only_benchmarks),
    )
    assert "usage" in result.stdout
