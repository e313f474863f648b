"""The one place that builds a benchmark case: a LoRA or DoRA layer, per implementation.

A case is one implementation of one layer shape, ready to run:

- ``floor``: the frozen ``nn.Linear`` alone (``y = x Wᵀ + b``), the cost no adapter can avoid;
- ``naive``, ``torch``, ``triton``: ``peft_kernels.lora_linear`` / ``dora_linear`` with that
  backend (the torch and triton DoRA cases get ``‖W_i‖²`` precomputed, as a real layer caches it:
  W is frozen);
- ``peft``: a real ``peft`` LoRA / DoRA ``Linear`` injected around an ``nn.Linear``.

Every implementation of one ``CaseSpec`` shares the same values: x (M, in) requiring grad, W
(out, in) and b (out,) frozen, A (r, in), B (out, r) non-zero, m (out,) trainable, and the
fixed output gradient (M, out). The pytest-benchmark suites, the sweep runner and the tests
all build their cases here.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

import peft_kernels
from benchmarks.memory import saved_storages, storage_key
from peft_kernels.naive import dora_weight_norm_direct

METHODS = ("lora", "dora")
MODES = ("forward", "forward_backward")
IMPLEMENTATIONS = ("floor", "naive", "torch", "triton", "peft")
FUNCTIONAL_BACKENDS = ("naive", "torch", "triton")


@dataclass(frozen=True)
class CaseSpec:
    """One layer: ``x (rows, in_features) -> y (rows, out_features)``, adapter rank ``rank``."""

    method: str
    rows: int
    in_features: int
    out_features: int
    rank: int
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    dropout_p: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")

    @property
    def lora_alpha(self) -> int:
        """peft's ``lora_alpha``; ``2r`` makes the scaling ``alpha / r`` = 2 at every rank."""
        return 2 * self.rank

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.rank

    def label(self) -> str:
        """A short human-readable name, e.g. ``dora M=512 2048x2048 r=16 p=0``."""
        return (
            f"{self.method} M={self.rows} {self.in_features}x{self.out_features} "
            f"r={self.rank} p={self.dropout_p:g}"
        )


@dataclass(frozen=True)
class SavedBytes:
    """Bytes autograd keeps for backward, parameters and frozen weights excluded.

    ``total`` counts each distinct storage once; ``beyond_x`` is ``total`` less x's storage.
    """

    total: int
    beyond_x: int


@dataclass
class LayerTensors:
    """The shared values of one case; shapes as in ``peft_kernels.lora_linear``/``dora_linear``."""

    x: Tensor  # (M, in), requires grad
    weight: Tensor  # (out, in), frozen
    bias: Tensor  # (out,), frozen
    lora_A: Tensor  # (r, in), trainable
    lora_B: Tensor  # (out, r), trainable, non-zero
    magnitude: Tensor  # (out,), trainable (DoRA only)
    weight_sq_norm: Tensor  # (out,), the cached ‖W_i‖² (float32 or wider)
    grad_output: Tensor  # (M, out), the fixed gradient fed to backward


@dataclass
class BenchCase:
    """One implementation of one ``CaseSpec``: ``forward()``, ``forward_backward()``, bytes saved.

    ``run`` computes y (M, out) from the case's tensors with autograd recording; ``inputs`` are
    the tensors whose ``.grad`` a backward fills (x and the trainable parameters);
    ``excluded`` are the parameters and frozen weights not counted as saved activations.
    """

    spec: CaseSpec
    implementation: str
    run: Callable[[], Tensor]
    x: Tensor
    grad_output: Tensor
    inputs: tuple[Tensor, ...]
    excluded: tuple[Tensor, ...]
    module: nn.Module | None = field(default=None, repr=False)

    def forward(self) -> Tensor:
        """One training forward (autograd records the graph, which is then dropped)."""
        with torch.enable_grad():
            return self.run()

    def forward_backward(self) -> None:
        """Grads reset to None, then one forward and ``y.backward(grad_output)``."""
        for tensor in self.inputs:
            tensor.grad = None
        with torch.enable_grad():
            self.run().backward(self.grad_output)

    def saved_bytes(self) -> SavedBytes:
        """Measure what one forward leaves saved for backward (see ``measure_saved_bytes``)."""
        return measure_saved_bytes(self.run, self.x, self.excluded)


def measure_saved_bytes(
    run: Callable[[], Tensor], x: Tensor, excluded: Iterable[Tensor]
) -> SavedBytes:
    """Bytes of the tensors that ``run()``'s graph still holds for backward once it returned.

    Every tensor autograd saves passes through a ``saved_tensors_hooks`` pack hook; a weak
    reference tells which ones the live graph still holds after the forward (temporaries of a
    graph that was dropped inside the forward do not count). Distinct storages are counted
    once by ``untyped_storage().data_ptr()``; storages of ``excluded`` tensors (parameters,
    frozen weights, cached norms: matched by identity of their storage) are left out.
    """
    excluded_keys = {storage_key(tensor) for tensor in excluded}
    with torch.enable_grad():
        y, storages = saved_storages(run, excluded_keys)
    del y
    total = sum(storages.values())
    return SavedBytes(total=total, beyond_x=total - storages.get(storage_key(x), 0))


def triton_runnable(device: str | torch.device) -> bool:
    """Whether triton is benchmarked here: CUDA only (the CPU interpreter is far too slow)."""
    device = torch.device(device)
    return device.type == "cuda" and "triton" in peft_kernels.available_backends(device)


def peft_installed() -> bool:
    return importlib.util.find_spec("peft") is not None


def implementations_for(device: str | torch.device) -> list[str]:
    """The implementations benchmarked on ``device``, in ``IMPLEMENTATIONS`` order."""
    names = ["floor", "naive", "torch"]
    if triton_runnable(device):
        names.append("triton")
    if peft_installed():
        names.append("peft")
    return names


def make_tensors(spec: CaseSpec) -> LayerTensors:
    """Random but reproducible values for ``spec`` (drawn in float32 on the CPU, then moved)."""
    generator = torch.Generator().manual_seed(spec.seed)
    m, n_in, n_out, r = spec.rows, spec.in_features, spec.out_features, spec.rank

    def draw(*shape: int, scale: float = 1.0) -> Tensor:
        return torch.randn(*shape, generator=generator) * scale

    weight = draw(n_out, n_in, scale=n_in**-0.5)
    lora_A = draw(r, n_in, scale=n_in**-0.5)
    lora_B = draw(n_out, r, scale=0.1 * r**-0.5)  # non-zero, so the adapter does real work
    norm = dora_weight_norm_direct(weight, lora_A, lora_B, spec.scaling)
    magnitude = norm * (1.0 + 0.1 * torch.rand(n_out, generator=generator))
    bias = draw(n_out, scale=0.1)
    x = draw(m, n_in)
    grad_output = draw(m, n_out)

    def place(tensor: Tensor, requires_grad: bool = False) -> Tensor:
        moved = tensor.to(device=spec.device, dtype=spec.dtype)
        return moved.requires_grad_(requires_grad)

    weight = place(weight)
    return LayerTensors(
        x=place(x, requires_grad=True),
        weight=weight,
        bias=place(bias),
        lora_A=place(lora_A, requires_grad=True),
        lora_B=place(lora_B, requires_grad=True),
        magnitude=place(magnitude, requires_grad=True),
        weight_sq_norm=peft_kernels.weight_row_sq_norm(weight),
        grad_output=place(grad_output),
    )


def _frozen_linear(t: LayerTensors) -> nn.Linear:
    """An ``nn.Linear`` whose frozen weight and bias share storage with ``t``'s."""
    out_features, in_features = t.weight.shape
    linear = nn.Linear(in_features, out_features, device="meta")
    linear.weight = nn.Parameter(t.weight, requires_grad=False)
    linear.bias = nn.Parameter(t.bias, requires_grad=False)
    return linear


class _OneLinear(nn.Module):
    """A model of one ``nn.Linear`` named ``proj``: what peft injects its adapter into."""

    def __init__(self, proj: nn.Linear) -> None:
        super().__init__()
        self.proj = proj


def _peft_layer(spec: CaseSpec, t: LayerTensors) -> nn.Module:
    """peft's LoRA/DoRA ``Linear`` around a frozen ``nn.Linear``, holding ``t``'s values."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.dropout_p,
        target_modules=["proj"],
        use_dora=spec.method == "dora",
    )
    model = inject_adapter_in_model(config, _OneLinear(_frozen_linear(t)))
    layer = model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(t.lora_A)
        layer.lora_B["default"].weight.copy_(t.lora_B)
        if spec.method == "dora":
            layer.lora_magnitude_vector["default"].weight.copy_(t.magnitude)
    layer.train()
    for name, parameter in layer.named_parameters():
        if parameter.dtype != spec.dtype:
            raise RuntimeError(f"peft left {name} in {parameter.dtype}, expected {spec.dtype}")
    return layer


def _functional_run(spec: CaseSpec, t: LayerTensors, backend: str) -> Callable[[], Tensor]:
    s, p = spec.scaling, spec.dropout_p
    if spec.method == "lora":
        return lambda: peft_kernels.lora_linear(
            t.x, t.weight, t.bias, t.lora_A, t.lora_B, s, p, training=True, backend=backend
        )
    sq_norm = None if backend == "naive" else t.weight_sq_norm  # cached, as a real layer does
    return lambda: peft_kernels.dora_linear(
        t.x,
        t.weight,
        t.bias,
        t.lora_A,
        t.lora_B,
        t.magnitude,
        s,
        p,
        training=True,
        backend=backend,
        weight_sq_norm=sq_norm,
    )


def _trainable(spec: CaseSpec, t: LayerTensors) -> tuple[Tensor, ...]:
    adapters = (t.lora_A, t.lora_B) + ((t.magnitude,) if spec.method == "dora" else ())
    return (t.x, *adapters)


def build_case(spec: CaseSpec, implementation: str, tensors: LayerTensors) -> BenchCase:
    """The ``implementation`` of ``spec`` over the shared ``tensors`` (see ``make_tensors``)."""
    t = tensors
    frozen = (t.weight, t.bias, t.weight_sq_norm)
    common = {
        "spec": spec,
        "implementation": implementation,
        "x": t.x,
        "grad_output": t.grad_output,
    }
    if implementation == "floor":
        linear = _frozen_linear(t)
        return BenchCase(
            run=lambda: linear(t.x), inputs=(t.x,), excluded=frozen, module=linear, **common
        )
    if implementation in FUNCTIONAL_BACKENDS:
        if implementation == "triton" and not triton_runnable(spec.device):
            raise RuntimeError(f"the triton backend is not benchmarked on {spec.device}")
        trainable = _trainable(spec, t)
        return BenchCase(
            run=_functional_run(spec, t, implementation),
            inputs=trainable,
            excluded=frozen + trainable[1:],
            **common,
        )
    if implementation == "peft":
        layer = _peft_layer(spec, t)
        parameters = tuple(layer.parameters())
        return BenchCase(
            run=lambda: layer(t.x),
            inputs=(t.x, *(q for q in parameters if q.requires_grad)),
            excluded=frozen + parameters,
            module=layer,
            **common,
        )
    raise ValueError(f"unknown implementation {implementation!r}; choose from {IMPLEMENTATIONS}")


def build_cases(
    spec: CaseSpec, implementations: Iterable[str] | None = None
) -> dict[str, BenchCase]:
    """Every implementation of ``spec`` (default: all that run on its device), same values."""
    if implementations is None:
        implementations = implementations_for(spec.device)
    tensors = make_tensors(spec)
    return {name: build_case(spec, name, tensors) for name in implementations}


def mode_callable(case: BenchCase, mode: str) -> Callable[[], object]:
    """``case.forward`` or ``case.forward_backward`` by mode name (one of ``MODES``)."""
    if mode == "forward":
        return case.forward
    if mode == "forward_backward":
        return case.forward_backward
    raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")


def saved_bytes_of(cases: Mapping[str, BenchCase]) -> dict[str, SavedBytes]:
    """``SavedBytes`` of every case, by implementation."""
    return {name: case.saved_bytes() for name, case in cases.items()}
