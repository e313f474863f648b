"""``python -m benchmarks mixed``: many LoRA adapters on one base, one batch mixing them.

On the embedded SmolLM2-135M-Instruct (or ``--model DIR``), LoRA r=16 on all linear layers but
the output layer, k adapters (default 1, 4, 16) with the batch's rows spread evenly over them:

1. ``forward``: a forward without grad; ours mixed (``mixed_batch``) against ours with one
   adapter on the same batch, against peft's ``adapter_names`` forward, and peft mixed against
   peft with one adapter;
2. ``train``: a training step (forward, causal-LM loss, backward, AdamW step over the adapters)
   with mixed rows, against ours with one adapter (peft refuses ``adapter_names`` in training:
   its refusal is recorded);
3. ``generate``: greedy ``generate`` of ``--new-tokens`` tokens with mixed rows, ours against
   peft.

Each part is timed in paired rounds (round k runs every variant of the part once, in an order
rotated by k, after one untimed call of each); ratios are the median [min-max] of the per-round
ratios. Ours and peft hold the same adapter values (written once in the PEFT format): their
logits must agree or the run stops. A table on stdout, ``<date>_<device>_mixed.csv`` / ``.json``
under ``--out``, a progress bar on stderr.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from benchmarks.environment import (
    DTYPES,
    add_run_arguments,
    check_run_arguments,
    file_stem,
    run_metadata,
    torch_threads,
)
from benchmarks.mixed_report import PARTS, format_table, ratio_rows, time_rows, write_files
from benchmarks.mixed_variants import (
    ADAPTER_COUNTS,
    build_ours_named,
    build_ours_single,
    build_peft,
    forward_call,
    make_optimizer,
    ours_mixed,
    peft_training_refusal,
    row_names,
    train_step_call,
    trainable_parameters,
    write_adapters,
)
from benchmarks.model_variants import (
    decode_callable,
    load_base_model,
    make_batch,
    model_source,
    peft_installed,
    temporary_root,
)
from benchmarks.progress import progress_bar
from benchmarks.timing import CLOCKS, sample_interleaved

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
# Paired rounds per part by default: ~12 minutes on SmolLM2 with 2 quiet cores (one generate
# call of peft's 16-adapter loop alone takes ~20 s).
ROUNDS = {"forward": 9, "train": 5, "generate": 3}
# Largest |ours - peft| over the largest |peft| of the logits (same adapters, same batch).
LOGIT_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks mixed",
        description="Mixed-adapter batches: forward, training step and generate, ours and peft.",
    )
    add_run_arguments(parser, model_source=True)
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="paired rounds of every part (default: forward 5, train 3, generate 3)",
    )
    parser.add_argument(
        "--adapters",
        type=int,
        nargs="+",
        default=list(ADAPTER_COUNTS),
        help="adapter counts k (default 1 4 16)",
    )
    parser.add_argument(
        "--parts", nargs="+", choices=tuple(PARTS), default=list(PARTS), help="what to time"
    )
    parser.add_argument("--batch", type=int, default=16, help="rows (>= the largest k)")
    parser.add_argument("--seq", type=int, default=64, help="tokens per row")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per row")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="prompt length (generate)")
    parser.add_argument(
        "--clock",
        choices=CLOCKS,
        default="wall",
        help="wall time, or this process's CPU time (a machine shared with other jobs)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    check_run_arguments(parser, args)
    if args.quick:
        args.batch, args.seq, args.prompt_tokens, args.new_tokens = 16, 8, 4, 4
    for name in ("threads", "batch", "seq", "rank", "new_tokens", "prompt_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.rounds is None and args.quick:
        args.rounds = 2
    args.rounds = {part: args.rounds or ROUNDS[part] for part in args.parts}
    args.adapters = sorted(set(args.adapters))
    if args.adapters[0] < 1:
        parser.error("--adapters: every count must be >= 1")
    if args.adapters[-1] > args.batch:
        parser.error(
            f"--adapters {args.adapters[-1]} needs at least that many rows: --batch {args.batch}"
        )
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if not peft_installed():
        parser.error("peft is not installed: this benchmark compares against it (pip install peft)")
    return args


def _relative_error(ours: Tensor, theirs: Tensor) -> float:
    return float((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max())


def _check_logits(name: str, ours: Tensor, theirs: Tensor, dtype: torch.dtype) -> str:
    """Ours and peft hold the same adapters: their logits must agree, else the run stops."""
    error = _relative_error(ours, theirs)
    if not error <= LOGIT_TOLERANCE[dtype]:
        raise RuntimeError(
            f"{name}: lightning-peft's logits differ from peft's by {error:.3g} (relative); "
            "the two are not computing the same model, the timings would mislead"
        )
    return f"{name}: logits lightning-peft = peft (max relative difference {error:.1e})"


def _check_distinct(mixed: Tensor, single: Tensor, rows: Sequence[str], dtype: torch.dtype) -> str:
    """The adapters do distinct work: mixed rows of other adapters than ``a0`` differ from the
    one-adapter (``a0``) logits, rows of ``a0`` do not (else the run stops)."""
    first = torch.tensor([name == "a0" for name in rows])
    errors = [_relative_error(mixed[i], single[i]) for i in range(len(rows))]
    same = max(e for e, f in zip(errors, first, strict=True) if f)
    others = [e for e, f in zip(errors, first, strict=True) if not f]
    if not same <= LOGIT_TOLERANCE[dtype] or (others and min(others) < 10 * LOGIT_TOLERANCE[dtype]):
        raise RuntimeError(
            f"mixed rows of a0 differ from the one-adapter model's by {same:.3g}, rows of the "
            f"other adapters by as little as {min(others, default=0):.3g}: the adapters do not "
            "do distinct work, the timings would mislead"
        )
    return (
        f"rows of a0 equal the one-adapter model's ({same:.1e}); rows of the other adapters "
        f"differ ({min(others, default=0):.1e} at least)"
    )


class Parts:
    """The models of one run and the timed calls of each part, built over one base."""

    def __init__(self, args: argparse.Namespace, base: nn.Module, scratch: Path) -> None:
        self.args = args
        self.counts = args.adapters
        self.directories, self.adapted = write_adapters(
            base, self.counts[-1], args.rank, args.alpha, scratch
        )
        first = next(iter(self.directories.values()))
        self.ours_single = build_ours_single(base, first)
        self.ours_named = build_ours_named(base, self.directories)
        self.peft = build_peft(base, self.directories)
        device = next(base.parameters()).device
        self.ids = make_batch(base.config.vocab_size, args.batch, args.seq, device)
        self.prompt = make_batch(base.config.vocab_size, args.batch, args.prompt_tokens, device)
        self.rows = {count: row_names(args.batch, count) for count in self.counts}

    def _mixed(self, count: int) -> Callable:
        return partial(ours_mixed, self.ours_named, self.rows[count])

    def forward(self) -> dict[str, Callable[[], object]]:
        self._eval()
        calls = {
            "ours single": forward_call(self.ours_single, self.ids, nullcontext),
            "peft single": forward_call(self.peft, self.ids, nullcontext),
        }
        for count in self.counts:
            calls[f"ours mixed {count}"] = forward_call(
                self.ours_named, self.ids, self._mixed(count)
            )
            calls[f"peft mixed {count}"] = forward_call(
                self.peft, self.ids, nullcontext, adapter_names=self.rows[count]
            )
        return calls

    def generate(self) -> dict[str, Callable[[], object]]:
        self._eval()
        calls = {}
        new = self.args.new_tokens
        for count in self.counts:
            calls[f"ours mixed {count}"] = decode_callable(
                self.ours_named, self.prompt, new, self._mixed(count)
            )
            calls[f"peft mixed {count}"] = decode_callable(
                self.peft, self.prompt, new, nullcontext, adapter_names=self.rows[count]
            )
        return calls

    def train(self) -> dict[str, Callable[[], object]]:
        self.ours_single.train()
        single = make_optimizer(trainable_parameters(self.ours_single))
        calls = {"ours single": train_step_call(self.ours_single, self.ids, nullcontext, single)}
        self.ours_named.train()
        named = make_optimizer(trainable_parameters(self.ours_named))
        for count in self.counts:
            calls[f"ours mixed {count}"] = train_step_call(
                self.ours_named, self.ids, self._mixed(count), named
            )
        return calls

    def _eval(self) -> None:
        for model in (self.ours_single, self.ours_named, self.peft):
            model.eval()


def _check_part(part: str, first: dict[str, object], parts: Parts, dtype: torch.dtype) -> list:
    """Agreement notes from each variant's first (untimed) call; raises when logits differ."""
    top = parts.counts[-1]
    if part == "forward":
        return [
            _check_logits("one adapter", first["ours single"], first["peft single"], dtype),
            _check_logits(
                f"{top} adapters, mixed rows",
                first[f"ours mixed {top}"],
                first[f"peft mixed {top}"],
                dtype,
            ),
            _check_distinct(
                first[f"ours mixed {top}"], first["ours single"], parts.rows[top], dtype
            ),
        ]
    if part == "generate":
        notes = []
        for count in parts.counts:
            ours, theirs = first[f"ours mixed {count}"], first[f"peft mixed {count}"]
            same = int((ours == theirs).all(dim=1).sum())
            notes.append(
                f"generate, {count} adapters: {same} of {ours.shape[0]} rows' tokens "
                "identical to peft's"
            )
        return notes
    single, mixed = float(first["ours single"]), float(first[f"ours mixed {parts.counts[0]}"])
    return [
        f"training, first step: loss one adapter {single:.6f}, "
        f"mixed with {parts.counts[0]} adapter(s) {mixed:.6f}"
    ]


def run(args: argparse.Namespace) -> tuple[str, list[Path]]:
    """Build, measure and report; returns (table, files written)."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    model_dir, shape, model_name = model_source(args)
    with torch_threads(args.threads), temporary_root() as scratch:
        base = load_base_model(model_dir, shape, dtype, device)
        parts = Parts(args, base, Path(scratch))
        metadata = run_metadata(device, dtype, torch.get_num_threads())
        metadata.update(
            model=model_name,
            parameters=sum(p.numel() for p in base.parameters()),
            adapted_modules=parts.adapted,
            rank=args.rank,
            alpha=args.alpha,
            batch=args.batch,
            seq=args.seq,
            adapter_counts=parts.counts,
            rounds=args.rounds,
            new_tokens=args.new_tokens,
            prompt_tokens=args.prompt_tokens,
            clock=args.clock,
            parts=args.parts,
            # the targets are set for SmolLM2-135M, 16 adapters, r=16: not for --quick
            targets=not args.quick,
            checks=[],
        )
        if "train" in args.parts:
            metadata["peft_train_refusal"] = peft_training_refusal(
                parts.peft, parts.ids, parts.rows[parts.counts[-1]]
            )
        print(
            f"{model_name}: k = {', '.join(map(str, parts.counts))} adapters, parts "
            f"{', '.join(args.parts)}, paired rounds {args.rounds}, {args.dtype}, "
            f"{metadata['device_name']}, {metadata['threads']} threads",
            flush=True,
        )
        builders = {"forward": parts.forward, "generate": parts.generate, "train": parts.train}
        order = [part for part in ("forward", "generate", "train") if part in args.parts]
        sizes = {"forward": 2 + 2 * len(parts.counts), "generate": 2 * len(parts.counts)}
        sizes["train"] = 1 + len(parts.counts)
        bar = progress_bar(
            sum(sizes[p] * (args.rounds[p] + 1) for p in order), not args.no_progress
        )
        rows: list[dict[str, object]] = []
        try:
            for part in order:  # training last: its steps move the adapters away from peft's
                calls = builders[part]()
                first = {}
                for key, call in calls.items():
                    bar.set_description(f"{part} warm-up {key}")
                    first[key] = call()
                    bar.update()
                metadata["checks"] += _check_part(part, first, parts, dtype)
                del first
                bar.set_description(f"{part} rounds")
                samples = sample_interleaved(
                    calls,
                    device,
                    args.rounds[part],
                    on_sample=lambda _: bar.update(),
                    clock=args.clock,
                )
                rows += time_rows(part, samples) + ratio_rows(part, samples, parts.counts)
        finally:
            bar.close()
        del parts, base
        gc.collect()
    stem = f"{file_stem(metadata)}_mixed"
    return format_table(rows, metadata), write_files(rows, metadata, args.out, stem)


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
