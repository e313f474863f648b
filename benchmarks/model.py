"""``python -m benchmarks model``: the whole-model benchmark on a real Llama.

On the embedded SmolLM2-135M-Instruct (or ``--model DIR``, any causal LM transformers loads):
the floor (no adapters, every weight frozen), lightning-peft and peft side by side, LoRA and DoRA
on all linear layers (r=16, alpha=32), dropout 0 and 0.05, a batch of 4x128 tokens:

- the training step (forward + causal-LM loss + backward) as a multiple of the floor's;
- what the step saves for backward (shared storages once, parameters excluded) and its peak;
- decoding tokens/s (``generate`` of 32 new tokens, batch 1) for the base model, unmerged
  lightning-peft LoRA, unmerged peft LoRA and the merged model.

All variants share one copy of the frozen weights and are timed in paired rounds: round k runs
every variant once, in an order rotated by k, and each variant's time is divided by the floor's
(decoding: the base model's) of the same round. A table on stdout, ``<date>_<device>_model``
``.csv`` / ``.json`` / ``.png`` under ``--out``, a progress bar on stderr.
"""

from __future__ import annotations

import argparse
import gc
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.environment import (
    DTYPES,
    add_run_arguments,
    check_run_arguments,
    file_stem,
    run_metadata,
    torch_threads,
)
from benchmarks.memory import measure_step_memory
from benchmarks.model_report import decode_rows, format_table, plot, train_rows, write_files
from benchmarks.model_variants import (
    METHODS,
    AdapterSpec,
    adapter_dir_for,
    build_merged,
    build_ours,
    build_peft,
    decode_callable,
    load_base_model,
    make_batch,
    model_source,
    peft_installed,
    temporary_root,
    training_callables,
    write_adapter,
)
from benchmarks.progress import progress_bar
from benchmarks.timing import CLOCKS, SampleTimer, sample_interleaved

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
# Loss agreement of ours and peft (same adapter values, dropout off), relative.
LOSS_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks model",
        description="Whole-model LoRA/DoRA benchmark: floor, lightning-peft and peft side by side.",
    )
    add_run_arguments(parser, model_source=True)
    parser.add_argument("--rounds", type=int, default=None, help="paired rounds (default 8)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.05])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per decode")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--no-decode", action="store_true", help="skip the decoding rounds")
    parser.add_argument("--no-train", action="store_true", help="skip the training rounds")
    parser.add_argument(
        "--clock",
        choices=CLOCKS,
        default="wall",
        help="wall time, or this process's CPU time (a machine shared with other jobs)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    check_run_arguments(parser, args)
    for name in ("threads", "batch", "seq", "rank", "new_tokens", "prompt_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.rounds is None:
        args.rounds = 2 if args.quick else 8
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.no_train and args.no_decode:
        parser.error("--no-train and --no-decode leave nothing to measure")
    if any(not 0.0 <= p < 1.0 for p in args.dropouts):
        parser.error("--dropouts must lie in [0, 1)")
    if args.quick:
        args.batch, args.seq, args.new_tokens = min(args.batch, 2), min(args.seq, 16), 4
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    return args


def _check_losses(losses: dict[str, float], specs, dtype: torch.dtype) -> list[str]:
    """Ours and peft hold the same adapter values: with dropout off their losses must agree."""
    notes = []
    for spec in specs:
        ours, theirs = losses.get(f"{spec.label()} ours"), losses.get(f"{spec.label()} peft")
        if ours is None or theirs is None or spec.dropout_p > 0:
            continue
        error = abs(ours - theirs) / max(abs(theirs), 1e-12)
        if not math.isfinite(error) or error > LOSS_TOLERANCE[dtype]:
            raise RuntimeError(
                f"{spec.label()}: lightning-peft loss {ours:.6g} != peft loss {theirs:.6g}; "
                "the two are not computing the same model, the timings would mislead"
            )
        notes.append(f"{spec.label()}: loss lightning-peft {ours:.6f} = peft {theirs:.6f}")
    return notes


def run(args: argparse.Namespace) -> tuple[str, list[Path]]:
    """Build, measure and report; returns (table, files written)."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    model_dir, shape, model_name = model_source(args)
    with_peft = peft_installed()
    specs = [AdapterSpec(m, p, args.rank, args.alpha) for m in args.methods for p in args.dropouts]
    with torch_threads(args.threads), temporary_root() as scratch:
        base = load_base_model(model_dir, shape, dtype, device)
        base.train()
        ids = make_batch(base.config.vocab_size, args.batch, args.seq, device)
        prompt = make_batch(base.config.vocab_size, 1, args.prompt_tokens, device)

        # --- variants over shared weights -----------------------------------------------------
        train = {"floor": (base, True)}
        keys = {"floor": ("-", 0.0, "floor")}
        adapted = 0
        for spec in specs:
            directory = adapter_dir_for(Path(scratch), spec)
            adapted = write_adapter(base, spec, directory)
            train[f"{spec.label()} ours"] = (build_ours(base, spec, directory), False)
            keys[f"{spec.label()} ours"] = (spec.method, spec.dropout_p, "ours")
            if with_peft:
                train[f"{spec.label()} peft"] = (build_peft(base, spec, directory), False)
                keys[f"{spec.label()} peft"] = (spec.method, spec.dropout_p, "peft")
        decode_models = {}
        if not args.no_decode:
            lora = next((s for s in specs if s.method == "lora"), None)
            decode_models["base"] = (base, ("-", "base"))
            if lora is not None:
                decode_models["LoRA ours"] = (train[f"{lora.label()} ours"][0], ("lora", "ours"))
                if with_peft:
                    peft_lora = train[f"{lora.label()} peft"][0]
                    decode_models["LoRA peft"] = (peft_lora, ("lora", "peft"))
                merged = build_merged(base, adapter_dir_for(Path(scratch), lora))
                decode_models["LoRA merged"] = (merged, ("lora", "merged"))

        metadata = run_metadata(device, dtype, torch.get_num_threads())
        metadata.update(
            model=model_name,
            parameters=sum(p.numel() for p in base.parameters()),
            layers=base.config.num_hidden_layers,
            adapted_modules=adapted,
            rank=args.rank,
            alpha=args.alpha,
            batch=args.batch,
            seq=args.seq,
            rounds=args.rounds,
            new_tokens=args.new_tokens,
            prompt_tokens=args.prompt_tokens,
            clock=args.clock,
            # the targets are set for SmolLM2-135M at 4x128 tokens, r=16: not for --quick
            targets=not args.quick,
        )
        print(
            f"{model_name}: {len(train)} training variants and {len(decode_models)} decoding "
            f"variants, {args.rounds} paired rounds, {args.dtype}, {metadata['device_name']}, "
            f"{metadata['threads']} threads",
            flush=True,
        )
        trained = {} if args.no_train else train
        total = len(trained) * (args.rounds + 1) + len(decode_models) * (args.rounds + 1)
        bar = progress_bar(total, not args.no_progress)
        rows: list[dict[str, object]] = []
        try:
            # --- warm-up step of every variant: saved bytes, peak memory, loss ----------------
            steps, memory, losses = {}, {}, {}
            for key, (model, floor) in trained.items():
                bar.set_description(f"memory {key}")
                forward_loss, step = training_callables(model, ids, floor)
                excluded = [*model.parameters(), *model.buffers()]
                clear = _grad_clearer(model)
                result = measure_step_memory(forward_loss, excluded, device, clear)
                memory[key] = (result.saved_bytes, result.peak_bytes)
                losses[key] = float(step())
                steps[key] = step
                bar.update()
            metadata["checks"] = _check_losses(losses, specs, dtype)

            # --- paired training rounds -------------------------------------------------------
            if steps:
                bar.set_description("training rounds")
                train_samples = sample_interleaved(
                    steps, device, args.rounds, on_sample=lambda _: bar.update(), clock=args.clock
                )
                rows += train_rows(train_samples, keys, memory)

            # --- decoding ---------------------------------------------------------------------
            if decode_models:
                for model, _ in decode_models.values():
                    model.eval()
                decoders = {
                    key: decode_callable(model, prompt, args.new_tokens)
                    for key, (model, _) in decode_models.items()
                }
                timer = SampleTimer(device, args.clock)
                for key, decoder in decoders.items():  # warm-up (caches, allocator)
                    bar.set_description(f"decode warm-up {key}")
                    timer(decoder, 1)
                    bar.update()
                bar.set_description("decoding rounds")
                decode_samples = sample_interleaved(
                    decoders,
                    device,
                    args.rounds,
                    on_sample=lambda _: bar.update(),
                    clock=args.clock,
                )
                decode_keys = {key: value for key, (_, value) in decode_models.items()}
                rows += decode_rows(decode_samples, decode_keys, args.new_tokens)
        finally:
            bar.close()
        del train, decode_models, base
        gc.collect()

    stem = f"{file_stem(metadata)}_model"
    files = write_files(rows, metadata, args.out, stem)
    if not args.no_plot:
        plots, note = plot(rows, metadata, args.out, stem)
        files += plots
        if note:
            print(note)
    return format_table(rows, metadata), files


def _grad_clearer(model: torch.nn.Module):
    trainable = [p for p in model.parameters() if p.requires_grad]

    def clear() -> None:
        for parameter in trainable:
            parameter.grad = None

    return clear


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    table, files = run(args)
    print(table)
    print()
    for path in files:
        print(f"wrote {path}")
    print(f"wall time {time.perf_counter() - started:.1f} s")
    return 0
