"""Bad input raises a clear TypeError/ValueError naming the problem; backend selection."""

import pytest
import torch

import peft_kernels
from peft_kernels import BACKEND_ENV_VAR, resolve_backend
from tests.helpers.reference import call, make_inputs


def dora_inputs():
    return make_inputs("dora", 5, 8, 6, 2)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda d: d.update(x=torch.randn(5, 9)), ValueError, "in_features=8"),
        (lambda d: d.update(lora_A=torch.randn(2, 7)), ValueError, "lora_A must be"),
        (lambda d: d.update(lora_B=torch.randn(5, 2)), ValueError, "lora_B must be"),
        (lambda d: d.update(lora_B=torch.randn(6, 3)), ValueError, "lora_B must be"),
        (
            lambda d: d.update(lora_A=torch.randn(0, 8), lora_B=torch.randn(6, 0)),
            ValueError,
            "rank r must be >= 1",
        ),
        (lambda d: d.update(bias=torch.randn(7)), ValueError, "bias must be"),
        (lambda d: d.update(x=torch.randn(5, 8, dtype=torch.float64)), TypeError, "dtype"),
        (lambda d: d.update(x=torch.ones(5, 8, dtype=torch.int64)), TypeError, "floating-point"),
        (lambda d: d.update(lora_A=torch.randn(2, 8, device="meta")), ValueError, "is on meta"),
        (lambda d: d.update(weight=torch.randn(6, 8, requires_grad=True)), ValueError, "frozen"),
        (lambda d: d.update(x=[[1.0] * 8]), TypeError, "must be a torch.Tensor"),
    ],
)
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_bad_input_raises_naming_the_problem(method, change, error, match):
    inputs = dora_inputs()
    if method == "lora":
        inputs.pop("magnitude")
    change(inputs)
    for backend in ("naive", "torch"):
        with pytest.raises(error, match=match):
            call(method, inputs, backend)


def test_magnitude_of_the_wrong_length():
    inputs = dora_inputs()
    inputs["magnitude"] = torch.randn(5)
    with pytest.raises(ValueError, match=r"magnitude must be \(out_features,\) = \(6,\)"):
        call("dora", inputs, "torch")


@pytest.mark.parametrize("p", [-0.1, 1.0])
def test_bad_dropout_p(p):
    with pytest.raises(ValueError, match="dropout_p"):
        call("lora", make_inputs("lora", 3, 4, 5, 1), "torch", p)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        call("lora", make_inputs("lora", 3, 4, 5, 1), "cuda")


def test_auto_is_torch_on_cpu_and_env_var_overrides(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    assert resolve_backend("auto", cpu) == "torch"
    monkeypatch.setenv(BACKEND_ENV_VAR, "naive")
    assert resolve_backend("auto", cpu) == "naive"
    assert resolve_backend("torch", cpu) == "torch"  # an explicit argument wins
    monkeypatch.setenv(BACKEND_ENV_VAR, "fast")
    with pytest.raises(ValueError, match=BACKEND_ENV_VAR):
        resolve_backend("auto", cpu)


def test_explicit_triton_that_cannot_run_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        resolve_backend("triton", torch.device("cpu"))
    monkeypatch.setattr(peft_kernels.backends, "_TRITON_INSTALLED", False)
    with pytest.raises(RuntimeError, match="not installed"):
        resolve_backend("triton", torch.device("cuda"))
    assert resolve_backend("auto", torch.device("cuda")) == "torch"  # auto falls back quietly


def test_kernels_imports_without_lightning_or_triton():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['lightning'] = None\n"
        "import torch, peft_kernels\n"
        "x = torch.randn(3, 4); w = torch.randn(5, 4)\n"
        "y = peft_kernels.lora_linear(x, w, None, torch.randn(2, 4), torch.randn(5, 2), 1.0)\n"
        "assert y.shape == (3, 5) and 'triton' not in peft_kernels.available_backends('cuda')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
