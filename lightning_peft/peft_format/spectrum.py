"""``lightning-peft inspect ADAPTER_DIR [--model DIR] [--compare DIR ...]``: how much rank each
update really uses, and (``--compare``) a combined adapter's spectra beside those of its parts.

For a LoRA module with ``A`` (r, in), ``B`` (out, r) and scale ``s``, the update is
``ΔW = s·B·A`` (out, in). With the reduced QR factorisations ``B = Q_B R_B`` and
``Aᵀ = Q_A R_A`` (``Q`` with orthonormal columns, ``R`` r×r), ``ΔW = Q_B (s·R_B R_Aᵀ) Q_Aᵀ``, so
the singular values of ΔW are those of the r×r core ``s·R_B R_Aᵀ``: O((out + in)·r²) work in
float64, never an out×in matrix. From them:

- ``‖ΔW‖_F = sqrt(Σ σ_i²)``; the effective rank at a fraction f of the energy is the smallest k
  with ``Σ_{i≤k} σ_i² ≥ f·Σ σ_i²`` (reported at 90%; the hint uses 99%);
- with the base model at hand (its weights file is read, the model is not built),
  ``‖ΔW‖_F / ‖W‖_F``. For DoRA, ``W' = (m/n) ⊙ (W + s·B·A)`` row-wise with
  ``n = ‖W + s·B·A‖_row``; its ``‖W' − W‖_F`` is computed row by row from ``W·Aᵀ`` (out, r) and
  ``A·Aᵀ`` (r, r), again without out×in. The spectrum shown for DoRA is that of ``s·B·A``, its
  direction update.

``--compare PART_DIR ...`` puts, module by module, the combined adapter's rank, effective rank and
``‖ΔW‖_F`` beside each part's (``format_comparison``) and plots their spectra together
(``plot_comparison``): how much of the parts' rank an SVD combination kept, and where ``linear``'s
cross terms or TIES's pruning changed the update's size.

Adapters written by this package or by ``peft`` (LoRA, rsLoRA, DoRA, rank/alpha patterns) on
linear layers, embeddings (ΔW is then (V, d), the transpose: the same singular values) and
ungrouped convolutions (ΔW = B·A on the flattened kernel).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lightning_peft.core.errors import InputError
from lightning_peft.methods.lora.config import LoRAConfig
from lightning_peft.peft_format.files import PREFIX, read_config, read_weights

# (key suffix in a PEFT file, factor): linear and convolution layers, embeddings (peft's names).
FACTOR_KEYS = (
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora_embedding_A", "A"),
    (".lora_embedding_B", "B"),
    (".lora_magnitude_vector", "magnitude"),
)
REPORT_ENERGY = 0.90
HINT_ENERGY = 0.99


def update_singular_values(lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """The r singular values of ``scaling · B · A`` (descending, float64), from the r×r core.

    Args:
        lora_A: (r, in); lora_B: (out, r); scaling: s.
    """
    if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[0] != lora_B.shape[1]:
        raise ValueError(
            f"lora_A (r, in) and lora_B (out, r) do not fit: {tuple(lora_A.shape)}, "
            f"{tuple(lora_B.shape)}"
        )
    r_b = torch.linalg.qr(lora_B.double(), mode="r").R  # (min(out, r), r)
    r_a = torch.linalg.qr(lora_A.double().T, mode="r").R  # (min(in, r), r)
    values = torch.linalg.svdvals(scaling * r_b @ r_a.T)
    return torch.cat([values, values.new_zeros(lora_A.shape[0] - len(values))])


def energy_rank(singular_values: Tensor, fraction: float) -> int:
    """The smallest k with ``Σ_{i≤k} σ_i² ≥ fraction · Σ σ_i²`` (0 for a zero update)."""
    energy = singular_values.double().square()
    total = float(energy.sum())
    if total == 0.0:
        return 0
    cumulative = energy.cumsum(0) / total
    return int((cumulative < fraction - 1e-12).sum()) + 1


def dora_delta_norm(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, scaling: float
) -> float:
    """``‖W' − W‖_F`` for DoRA's ``W' = (m/n) ⊙ (W + sBA)``, n the row norm, without out×in.

    Row i, with ``c = m_i / n_i``, ``d = s(BA)_i``: ``‖(c − 1)W_i + c·d‖² = (c − 1)²‖W_i‖² +
    2c(c − 1)⟨W_i, d⟩ + c²‖d‖²``; ``⟨W_i, d⟩ = s·(W Aᵀ)_i · B_i``, ``‖d‖² = s²·B_i (A Aᵀ) B_iᵀ``.
    """
    weight, lora_A, lora_B = weight.double(), lora_A.double(), lora_B.double()
    w_sq = weight.square().sum(1)
    cross = scaling * ((weight @ lora_A.T) * lora_B).sum(1)
    d_sq = scaling**2 * ((lora_B @ (lora_A @ lora_A.T)) * lora_B).sum(1)
    norm = (w_sq + 2 * cross + d_sq).clamp_min(0).sqrt()
    c = magnitude.double() / norm
    rows = (c - 1).square() * w_sq + 2 * c * (c - 1) * cross + c.square() * d_sq
    return float(rows.clamp_min(0).sum().sqrt())


@dataclass
class ModuleSpectrum:
    """One adapted module: its update's singular values and, with the base, its relative size."""

    name: str
    rank: int
    scaling: float
    singular_values: Tensor
    dora: bool = False
    weight_norm: float | None = None
    delta_norm: float | None = None  # ‖ΔW‖_F (DoRA: of W' − W, needs the base)

    def __post_init__(self) -> None:
        if self.delta_norm is None and not self.dora:
            self.delta_norm = float(self.singular_values.square().sum().sqrt())

    def effective_rank(self, fraction: float = REPORT_ENERGY) -> int:
        return energy_rank(self.singular_values, fraction)

    @property
    def relative_norm(self) -> float | None:
        if self.weight_norm is None or self.delta_norm is None or self.weight_norm == 0:
            return None
        return self.delta_norm / self.weight_norm


def _read_tensors(directory: Path) -> dict[str, Tensor]:
    """The adapter's tensors (``files.read_weights``: safetensors, or peft's older .bin)."""
    try:
        return read_weights(directory)[1]
    except (OSError, ValueError) as error:  # a missing or broken file is the user's input
        raise InputError(str(error)) from None


def read_lora_adapter(directory: str | Path) -> tuple[object, dict[str, dict[str, Tensor]]]:
    """(config, ``{module name: {"A", "B", "magnitude"?}}``) of a LoRA/DoRA adapter directory.

    Raises:
        InputError: not an adapter directory, an unreadable or non-LoRA adapter.
    """

    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"adapter directory {directory} does not exist")
    try:
        config = read_config(directory)
    except (OSError, ValueError) as error:
        raise InputError(str(error)) from None
    if not isinstance(config, LoRAConfig):
        raise InputError(
            f"{directory} holds a {type(config).__name__} adapter; inspect reads LoRA and DoRA "
            "(a bottleneck adapter is non-linear: it has no ΔW)"
        )
    modules: dict[str, dict[str, Tensor]] = {}
    for key, tensor in _read_tensors(directory).items():
        key = key.removeprefix(PREFIX)
        for suffix, part in FACTOR_KEYS:
            if key.endswith(suffix):
                modules.setdefault(key.removesuffix(suffix), {})[part] = tensor
    broken = [name for name, parts in modules.items() if not {"A", "B"} <= set(parts)]
    if broken:
        raise InputError(f"{directory}: module {broken[0]!r} lacks lora_A or lora_B")
    if not modules:
        raise InputError(f"{directory} holds no lora_A / lora_B tensors")
    for name, parts in modules.items():
        parts["A"], parts["B"] = _as_matrices(directory, name, parts["A"], parts["B"])
    return config, modules


def _as_matrices(directory: Path, name: str, lora_A: Tensor, lora_B: Tensor):
    """A (r, in·k…) and B (out, r) of a linear, embedding or (ungrouped) convolution adapter:
    a convolution's ΔW is ``B·A`` on the flattened kernel, its B a 1×1 kernel."""
    rank = lora_A.shape[0]
    if lora_B.dim() > 2 and lora_B.shape[1] == rank and all(d == 1 for d in lora_B.shape[2:]):
        lora_B = lora_B.reshape(lora_B.shape[0], rank)
    if lora_B.dim() != 2 or lora_B.shape[1] != rank:
        raise InputError(
            f"{directory}: {name!r} has lora_A {tuple(lora_A.shape)} and lora_B "
            f"{tuple(lora_B.shape)}: not a product B·A that inspect reads (a grouped convolution?)"
        )
    return lora_A.reshape(rank, -1), lora_B


class BaseWeights:
    """The ``<module>.weight`` tensors of a local transformers model directory, read one by one
    from its safetensors files (or its ``pytorch_model.bin``), without building the model."""

    def __init__(self, model_dir: str | Path) -> None:
        self.directory = Path(model_dir)
        if not self.directory.is_dir():
            raise InputError(f"model directory {self.directory} does not exist")
        files = sorted(self.directory.glob("*.safetensors"))
        self._bin: dict[str, Tensor] | None = None
        self._where: dict[str, Path] = {}
        if files:
            from safetensors import safe_open

            for path in files:
                with safe_open(str(path), framework="pt") as handle:
                    self._where |= dict.fromkeys(handle.keys(), path)
        elif (self.directory / "pytorch_model.bin").is_file():
            self._bin = torch.load(
                self.directory / "pytorch_model.bin", map_location="cpu", weights_only=True
            )
        else:
            raise InputError(f"{self.directory} has no *.safetensors or pytorch_model.bin weights")

    def get(self, module_name: str) -> Tensor | None:
        key = f"{module_name}.weight"
        if self._bin is not None:
            return self._bin.get(key)
        if key not in self._where:
            return None
        from safetensors import safe_open

        with safe_open(str(self._where[key]), framework="pt") as handle:
            return handle.get_tensor(key)


def inspect_adapter(
    adapter_dir: str | Path, model_dir: str | Path | None = None
) -> tuple[object, list[ModuleSpectrum]]:
    """(config, one ``ModuleSpectrum`` per adapted module, in name order)."""
    config, modules = read_lora_adapter(adapter_dir)
    base = BaseWeights(model_dir) if model_dir is not None else None
    spectra = []
    for name in sorted(modules, key=_natural):
        parts = modules[name]
        lora_A, lora_B = parts["A"], parts["B"]
        rank = lora_A.shape[0]
        _, alpha = config.rank_and_alpha(name)
        scaling = config.scaling_for(rank, alpha)
        spectrum = ModuleSpectrum(
            name,
            rank,
            scaling,
            update_singular_values(lora_A, lora_B, scaling),
            dora="magnitude" in parts,
        )
        weight = base.get(name) if base is not None else None
        if weight is not None:
            out_in = (lora_B.shape[0], lora_A.shape[1])
            if weight.dim() > 2:  # a convolution: (out, in, k…) as (out, in·k…)
                weight = weight.reshape(weight.shape[0], -1)
            if tuple(weight.shape) == out_in[::-1] and out_in[0] != out_in[1]:
                weight = weight.T  # Conv1D stores (in, out), an embedding (V, d)
            if tuple(weight.shape) != out_in:
                raise InputError(
                    f"{name}: the base weight has shape {tuple(weight.shape)}, the adapter "
                    f"needs {out_in}: is --model the adapter's base model?"
                )
            spectrum.weight_norm = float(weight.double().norm())
            if spectrum.dora:
                spectrum.delta_norm = dora_delta_norm(
                    weight, lora_A, lora_B, parts["magnitude"], scaling
                )
        spectra.append(spectrum)
    return config, spectra


def _natural(name: str) -> list:
    """``layers.2`` before ``layers.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def lower_rank_hint(spectra: list[ModuleSpectrum], fraction: float = HINT_ENERGY) -> str | None:
    """One line when every module's update holds ``fraction`` of its energy in at most half of
    its rank; None otherwise."""
    if not spectra:
        return None
    needed = max(s.effective_rank(fraction) for s in spectra)
    rank = max(s.rank for s in spectra)
    if needed == 0 or needed > rank // 2:
        return None
    return (
        f"hint: every module's update holds {100 * fraction:.0f}% of its energy in at most "
        f"{needed} of its {rank} directions: --rank {needed} would likely have done as well"
    )


def plot_spectra(spectra: list[ModuleSpectrum], path: str | Path, title: str) -> Path:
    """σ_i / σ_1 per module (log scale) and the cumulative energy, coloured by module kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({s.name.rpartition(".")[2] for s in spectra})
    colours = {k: plt.get_cmap("tab10")(i % 10) for i, k in enumerate(kinds)}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for s in spectra:
        values = s.singular_values
        if float(values[0]) == 0.0:
            continue
        kind = s.name.rpartition(".")[2]
        index = range(1, len(values) + 1)
        energy = values.square().cumsum(0) / values.square().sum()
        left.semilogy(index, (values / values[0]).clamp_min(1e-12), color=colours[kind], lw=0.7)
        right.plot(index, energy, color=colours[kind], lw=0.7, alpha=0.8)
    for kind in kinds:
        left.plot([], [], color=colours[kind], label=kind)
    left.set(xlabel="i", ylabel="σ_i / σ_1", title="singular values of ΔW = s·B·A")
    right.axhline(REPORT_ENERGY, color="grey", ls="--", lw=0.8)
    right.set(xlabel="k", ylabel="energy in the first k", ylim=(0, 1.02), title="cumulative")
    left.legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_report(
    config, spectra: list[ModuleSpectrum], adapter_dir: Path, model_dir: Path | None
) -> str:
    kind = "DoRA" if any(s.dora for s in spectra) else "LoRA"
    ranks = sorted({s.rank for s in spectra})
    lines = [
        f"adapter {adapter_dir}: {kind}, {len(spectra)} modules, rank "
        f"{'/'.join(map(str, ranks))}; base: {model_dir or 'not given (no ‖ΔW‖/‖W‖)'}"
    ]
    width = max(len(s.name) for s in spectra)
    lines.append(
        f"{'module':<{width}}  {'r':>3}  {'rank90':>6}  {'σ1':>9}  {'σr/σ1':>8}  {'‖ΔW‖/‖W‖':>9}"
    )
    for s in spectra:
        first = float(s.singular_values[0])
        last = float(s.singular_values[-1]) / first if first else 0.0
        relative = f"{s.relative_norm:.3e}" if s.relative_norm is not None else "-"
        lines.append(
            f"{s.name:<{width}}  {s.rank:>3}  {s.effective_rank():>6}  {first:>9.3e}  "
            f"{last:>8.2e}  {relative:>9}"
        )
    effective = sorted(s.effective_rank() for s in spectra)
    lines.append(
        f"effective rank at {100 * REPORT_ENERGY:.0f}% of the energy: median "
        f"{effective[len(effective) // 2]}, max {effective[-1]} (of rank {max(ranks)})"
    )
    relatives = [s.relative_norm for s in spectra if s.relative_norm is not None]
    if relatives:
        lines.append(
            f"‖ΔW‖/‖W‖: median {sorted(relatives)[len(relatives) // 2]:.3e}, "
            f"max {max(relatives):.3e}"
        )
    return "\n".join(lines)


def _label(directory: Path, others: list[Path]) -> str:
    """The directory's name, or its path where another directory has the same name."""
    names = [d.name for d in others]
    return directory.name if names.count(directory.name) == 1 else str(directory)


def format_comparison(
    combined: tuple[str, list[ModuleSpectrum]], parts: list[tuple[str, list[ModuleSpectrum]]]
) -> str:
    """Per module of the combined adapter: ``rank90/r`` and ``‖ΔW‖_F`` of it and of each part
    (``-`` where a part does not adapt the module); then each one's median effective rank."""
    columns = [combined, *parts]
    by_name = [{s.name: s for s in spectra} for _, spectra in columns]
    names = [s.name for s in combined[1]]
    width = max(len(n) for n in [*names, "module"])
    cell = max(14, *(len(label) for label, _ in columns))
    lines = [
        f"combined {combined[0]} beside its parts {', '.join(label for label, _ in parts)}: "
        "rank90/r and ‖ΔW‖_F per module",
        f"{'module':<{width}}" + "".join(f"  {label:>{cell}}" for label, _ in columns),
    ]
    for name in names:
        row = f"{name:<{width}}"
        for spectra in by_name:
            s = spectra.get(name)
            text = "-"
            if s is not None:
                norm = f"{s.delta_norm:.2e}" if s.delta_norm is not None else "-"
                text = f"{s.effective_rank()}/{s.rank} {norm}"
            row += f"  {text:>{cell}}"
        lines.append(row)
    medians = []
    for label, spectra in columns:
        effective = sorted(s.effective_rank() for s in spectra)
        medians.append(f"{label} {effective[len(effective) // 2]}")
    lines.append(f"median effective rank at 90%: {', '.join(medians)}")
    return "\n".join(lines)


def plot_comparison(
    combined: tuple[str, list[ModuleSpectrum]],
    parts: list[tuple[str, list[ModuleSpectrum]]],
    path: str | Path,
    modules: int = 6,
) -> Path:
    """σ_i (log scale) of the combined adapter (black) and of each part, one panel for each of
    the first ``modules`` modules of the combined adapter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s.name for s in combined[1]][:modules]
    columns = [combined, *parts]
    fig, axes = plt.subplots(1, len(names), figsize=(3 * len(names), 3), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        for i, (label, spectra) in enumerate(columns):
            s = next((s for s in spectra if s.name == name), None)
            if s is None or float(s.singular_values[0]) == 0.0:
                continue
            values = s.singular_values.clamp_min(1e-12 * float(s.singular_values[0]))
            style = {"color": "black", "lw": 1.6} if i == 0 else {"lw": 0.9, "ls": "--"}
            axis.semilogy(range(1, len(values) + 1), values, label=label, **style)
        axis.set_title(name, fontsize=7)
        axis.set_xlabel("i")
    axes[0][0].set_ylabel("σ_i of ΔW")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        sys.stderr.write(f"lightning-peft: error: {message} (see lightning-peft inspect -h)\n")
        raise SystemExit(2)


def main(argv: list[str]) -> None:
    """``lightning-peft inspect``; user errors raise ``InputError`` (one line, exit 2)."""
    parser = _OneLineParser(
        prog="lightning-peft inspect",
        description="Singular values, effective rank and relative size of each update "
        "ΔW = s·B·A of a LoRA/DoRA adapter directory (written here or by peft).",
    )
    parser.add_argument("adapter_dir", help="the adapter directory (adapter_config.json, ...)")
    parser.add_argument(
        "--model",
        help="the base model's local transformers directory, for ‖ΔW‖/‖W‖ (default: the "
        "adapter's base_model_name_or_path when that is a local directory)",
    )
    parser.add_argument(
        "--png", help="where to write the spectra plot (default: ADAPTER_DIR-spectra.png)"
    )
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument(
        "--compare",
        nargs="+",
        metavar="PART_DIR",
        help="the adapters ADAPTER_DIR combines (add_weighted_adapter): their spectra beside "
        "its own, and a plot ADAPTER_DIR-compare.png",
    )
    args = parser.parse_args(argv)
    adapter_dir = Path(args.adapter_dir)
    model_dir = Path(args.model) if args.model else _base_from_config(adapter_dir)
    config, spectra = inspect_adapter(adapter_dir, model_dir)
    part_dirs = [Path(d) for d in args.compare or []]
    labels = [_label(d, [adapter_dir, *part_dirs]) for d in [adapter_dir, *part_dirs]]
    parts = [
        (label, inspect_adapter(d, model_dir)[1])
        for label, d in zip(labels[1:], part_dirs, strict=True)
    ]
    print(format_report(config, spectra, adapter_dir, model_dir))
    hint = lower_rank_hint(spectra)
    if hint:
        print(hint)
    png = Path(args.png) if args.png else adapter_dir.parent / f"{adapter_dir.name}-spectra.png"
    print(f"spectra: {plot_spectra(spectra, png, str(adapter_dir))}")
    if parts:
        combined = (labels[0], spectra)
        print(format_comparison(combined, parts))
        compare_png = adapter_dir.parent / f"{adapter_dir.name}-compare.png"
        print(f"compared: {plot_comparison(combined, parts, compare_png)}")
    if args.json:
        figures = [
            {
                "module": s.name,
                "rank": s.rank,
                "scaling": s.scaling,
                "singular_values": s.singular_values.tolist(),
                "effective_rank_90": s.effective_rank(),
                "relative_norm": s.relative_norm,
                **({"parts": _part_values(s.name, parts)} if parts else {}),
            }
            for s in spectra
        ]
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")


def _part_values(name: str, parts: list[tuple[str, list[ModuleSpectrum]]]) -> dict:
    """``{part label: singular values at module name}`` (the parts that adapt it)."""
    return {
        label: s.singular_values.tolist()
        for label, spectra in parts
        for s in spectra
        if s.name == name
    }


def _base_from_config(adapter_dir: Path) -> Path | None:
    try:
        data = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None  # read_config names the problem
    base = data.get("base_model_name_or_path") if isinstance(data, dict) else None
    return Path(base) if base and Path(base).is_dir() else None
