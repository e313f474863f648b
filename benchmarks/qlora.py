"""``python -m benchmarks qlora``: QLoRA figures on a real model (SmolLM2-135M by default).

1. Weight memory: the model's state-dict bytes (shared storages once; bitsandbytes'
   quantization state included) in float32, nf4 with and without double quantization, int8;
   and what a merge re-quantized to nf4 (peft's) keeps of a low-rank update.
2. Training step (forward, backward, AdamW step) at batch ``--batch`` × ``--length`` tokens,
   LoRA r=``--rank`` on all linear layers, timed side by side in interleaved rounds (each round
   times every implementation once, starting at a different one): ours over float32, ours over
   nf4 (QLoRA), peft's QLoRA over the same nf4 model, and with ``--dora`` the DoRA pairs.
   Reported: median ms per step with its IQR, and the paired ratios (per round, then median and
   IQR over rounds): QLoRA / LoRA-fp32 and ours / peft.

Writes ``<date>_<device>_qlora.json`` under ``--out`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from benchmarks.environment import file_stem, run_metadata, torch_threads, usable_cpus
from benchmarks.timing import SampleTimer

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
RATIOS = {  # name -> (numerator, denominator)
    "QLoRA / LoRA-fp32": ("qlora", "lora-fp32"),
    "QLoRA ours / peft": ("qlora", "peft-qlora"),
    "QDoRA ours / peft": ("qdora", "peft-qdora"),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks qlora",
        description="QLoRA: weight memory fp32 vs 4/8-bit; training step QLoRA vs LoRA vs peft.",
    )
    parser.add_argument(
        "--model",
        default="smollm2",
        help="a transformers causal-LM directory, 'smollm2' (the embedded SmolLM2-135M, "
        "default) or 'tiny' (a 2-layer Llama from a config: seconds, for tests)",
    )
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds (default 8)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dora", action="store_true", help="also time QDoRA, ours and peft's")
    parser.add_argument("--threads", type=int, default=usable_cpus())
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


# -- models -------------------------------------------------------------------------------------


def model_dir(name: str, scratch: Path) -> Path:
    if name == "smollm2":
        from lightning_peft.cli.embedded import smollm2_path

        return Path(smollm2_path())
    if name == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
        )
        LlamaForCausalLM(config).save_pretrained(scratch / "tiny")
        return scratch / "tiny"
    return Path(name)


def load(directory: Path, mode: str | None) -> torch.nn.Module:
    """float32 (``mode`` None) or quantized by transformers with bitsandbytes, on the CPU."""
    from transformers import AutoModelForCausalLM

    from lightning_peft.lightning.precision import load_quantized

    if mode is None:
        return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return load_quantized(
        directory, mode.removesuffix("-nodq"), double_quant=not mode.endswith("-nodq")
    )


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every state-dict tensor, each storage once (tied embeddings)."""
    seen: dict[int, int] = {}
    for tensor in model.state_dict().values():
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def measure_memory(directory: Path) -> list[dict[str, object]]:
    from lightning_peft.core.bnb import import_bitsandbytes

    import_bitsandbytes()  # its import (seconds) is no part of a load
    rows = []
    modes = [
        ("float32", None),
        ("nf4 (double quant)", "nf4"),
        ("nf4", "nf4-nodq"),
        ("int8", "int8"),
    ]
    for label, mode in modes:
        start = time.perf_counter()
        model = load(directory, mode)
        seconds = time.perf_counter() - start
        rows.append({"weights": label, "MiB": weight_bytes(model) / 2**20, "load_s": seconds})
        del model
        gc.collect()
    base = rows[0]["MiB"]
    for row in rows:
        row["vs_fp32"] = row["MiB"] / base
    return rows


def requantization_loss(directory: Path, rank: int) -> list[dict[str, object]]:
    """What re-quantizing a merged weight (peft's QLoRA merge) keeps of a rank-``rank`` update
    ΔW of relative size ``‖ΔW‖ / ‖W‖``, on the first attention projection of the model: the
    share of ΔW realised along ΔW, and the rounding error relative to ``‖ΔW‖`` (nf4, double
    quantization). Why merging here de-quantizes to float instead."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    def round_trip(weight: torch.Tensor) -> torch.Tensor:
        return dequantize_4bit(*quantize_4bit(weight, quant_type="nf4", compress_statistics=True))

    model = load(directory, None)
    weight = next(m.weight for n, m in model.named_modules() if n.endswith("q_proj")).detach()
    base = round_trip(weight)  # the quantized base the adapter was trained on
    gen = torch.Generator().manual_seed(0)
    rows = []
    for relative in (0.01, 0.05, 0.2):
        update = torch.randn(weight.shape[0], rank, generator=gen) @ torch.randn(
            rank, weight.shape[1], generator=gen
        )
        update *= relative * base.norm() / update.norm()
        merged = round_trip(base + update)
        kept = ((merged - base) * update).sum() / update.square().sum()
        error = (merged - base - update).norm() / update.norm()
        rows.append({"relative_update": relative, "kept": kept.item(), "error": error.item()})
    return rows


# -- training steps -----------------------------------------------------------------------------


def adapted(directory: Path, implementation: str, rank: int) -> torch.nn.Module:
    """The model of one implementation, adapters on every linear layer but the output."""
    use_dora = "dora" in implementation
    base = load(directory, None if implementation == "lora-fp32" else "nf4")
    config = {"r": rank, "lora_alpha": 2 * rank, "target_modules": "all-linear"}
    if implementation.startswith("peft"):
        import peft

        return peft.get_peft_model(base, peft.LoraConfig(use_dora=use_dora, **config))
    from lightning_peft import LoRAConfig, inject_adapters

    inject_adapters(base, LoRAConfig(use_dora=use_dora, **config))
    return base


def training_step(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()

    return step


def time_paired(steps: dict[str, Callable[[], None]], rounds: int) -> dict[str, list[float]]:
    """Seconds per step, per implementation, one sample each per round in a rotated order."""
    timer = SampleTimer(torch.device("cpu"))
    names = list(steps)
    for name in names:  # warm-up
        steps[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc.disable()
    try:
        for index in range(rounds):
            for name in names[index % len(names) :] + names[: index % len(names)]:
                samples[name].append(timer(steps[name], 1))
    finally:
        gc.enable()
    return samples


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, q1, q3)."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return median, q1, q3


# -- run ----------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, object]:
    metadata = run_metadata(torch.device("cpu"), torch.float32, args.threads)
    with tempfile.TemporaryDirectory() as scratch, torch_threads(args.threads):
        directory = model_dir(args.model, Path(scratch))
        memory = measure_memory(directory)
        requantized = requantization_loss(directory, args.rank)
        names = ["lora-fp32", "qlora", "peft-qlora"] + (["qdora", "peft-qdora"] * args.dora)
        ids = torch.randint(
            0, 100, (args.batch, args.length), generator=torch.Generator().manual_seed(0)
        )
        models = {name: adapted(directory, name, args.rank) for name in names}
        samples = time_paired({n: training_step(m, ids) for n, m in models.items()}, args.rounds)
    steps = {
        name: dict(zip(("median_ms", "q1_ms", "q3_ms"), (1e3 * v for v in spread(s)), strict=True))
        for name, s in samples.items()
    }
    ratios = {}
    for label, (top, bottom) in RATIOS.items():
        if top in samples and bottom in samples:
            paired = [a / b for a, b in zip(samples[top], samples[bottom], strict=True)]
            ratios[label] = dict(zip(("median", "q1", "q3"), spread(paired), strict=True))
    metadata.update(
        model=str(args.model),
        batch=args.batch,
        length=args.length,
        rank=args.rank,
        rounds=args.rounds,
        bitsandbytes=_version("bitsandbytes"),
        transformers=_version("transformers"),
    )
    return {
        "metadata": metadata,
        "memory": memory,
        "requantized_merge": requantized,
        "steps": steps,
        "ratios": ratios,
    }


def _version(package: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def format_tables(result: dict[str, object]) -> str:
    meta = result["metadata"]
    lines = [
        f"QLoRA on {meta['model']} ({meta['device_name']}, {meta['threads']} threads, "
        f"torch {meta['torch']}, bitsandbytes {meta['bitsandbytes']}, peft {meta['peft']})",
        "",
        "| weights | MiB | × fp32 | load s |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r['weights']} | {r['MiB']:.1f} | {r['vs_fp32']:.3f} | {r['load_s']:.1f} |"
        for r in result["memory"]
    ]
    lines += [
        "",
        f"A merge re-quantized to nf4 (peft's QLoRA merge), rank-{meta['rank']} update ΔW:",
        "",
        "| ‖ΔW‖ / ‖W‖ | share of ΔW kept | rounding error / ‖ΔW‖ |",
        "|---:|---:|---:|",
    ]
    lines += [
        f"| {r['relative_update']} | {r['kept']:.2f} | {r['error']:.2f} |"
        for r in result["requantized_merge"]
    ]
    lines += [
        "",
        f"Training step, batch {meta['batch']}×{meta['length']}, r={meta['rank']} all-linear, "
        f"AdamW; {meta['rounds']} interleaved rounds (median [q1, q3]):",
        "",
        "| implementation | ms / step |",
        "|---|---:|",
    ]
    lines += [
        f"| {name} | {s['median_ms']:.0f} [{s['q1_ms']:.0f}, {s['q3_ms']:.0f}] |"
        for name, s in result["steps"].items()
    ]
    lines += ["", "| paired ratio | median [q1, q3] |", "|---|---:|"]
    lines += [
        f"| {label} | {r['median']:.3f} [{r['q1']:.3f}, {r['q3']:.3f}] |"
        for label, r in result["ratios"].items()
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    table = format_tables(result)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{file_stem(result['metadata'])}_qlora.json"
    path.write_text(json.dumps(result, indent=2), encoding="utf-8")
    (args.out / f"{file_stem(result['metadata'])}_qlora.md").write_text(table + "\n")
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
