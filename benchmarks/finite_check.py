"""The cost of ``PEFTCallback``'s finite check against a training step of the demo model.

The check's per-step work is timed alone (the same calls as ``PEFTCallback._check_finite``: the
trained gradients, one fused L2-norm reduction over them and the step's loss, one host
synchronisation), then a training step (forward, backward, AdamW) of the demo: SmolLM2-135M,
LoRA r=16 on every linear layer (210 modules, 420 tensors), batch 8x128, fp32. Both on one torch
thread, with the wall clock and this thread's CPU clock (the latter is what a shared machine
does not inflate).

    python -m benchmarks.finite_check [--steps 3] [--calls 300] [--batch 8] [--length 128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def timed(fn, n: int) -> tuple[list[float], list[float]]:
    """``n`` calls of ``fn``: wall and thread-CPU seconds of each."""
    wall, cpu = [], []
    for _ in range(n):
        w, c = time.perf_counter(), time.thread_time()
        fn()
        cpu.append(time.thread_time() - c)
        wall.append(time.perf_counter() - w)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from transformers import AutoModelForCausalLM

    from lightning_peft import LoRAConfig, inject_adapters
    from lightning_peft.cli.embedded import smollm2_path
    from lightning_peft.core.finite import local, maybe_non_finite

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_path()), dtype=torch.float32)
    report = inject_adapters(model, LoRAConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model.train()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for _, p in trained], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.length))
    losses: list[torch.Tensor] = []

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses[:] = [loss.detach()]
        optimizer.step()

    def check() -> bool:  # PEFTCallback._check_finite's work on a finite step
        grads = [local(p.grad) for _, p in trained if p.grad is not None]
        flags = torch.stack(
            [maybe_non_finite(grads).any(), maybe_non_finite(losses).any(), torch.zeros(()) > 0]
        )
        return any(flags.tolist())

    step()  # warm-up; leaves the gradients in place for the check
    elements = sum(p.numel() for _, p in trained)
    print(
        f"torch {torch.__version__}, 1 thread; {len(report.modules)} adapted modules, "
        f"{len(trained)} trained tensors, {elements:,} values; batch {args.batch}x{args.length}"
    )
    assert not check()
    timed(check, 20)  # warm-up
    check_wall, check_cpu = timed(check, args.calls)
    step_wall, step_cpu = timed(step, args.steps)
    after_wall, after_cpu = timed(check, args.calls)  # the check again, after the steps
    check_wall, check_cpu = check_wall + after_wall, check_cpu + after_cpu
    for clock, c, s in (("wall", check_wall, step_wall), ("cpu", check_cpu, step_cpu)):
        cm, sm = statistics.median(c), statistics.median(s)
        q = statistics.quantiles(c, n=10)
        print(
            f"{clock}: check median {cm * 1e3:.3f} ms (p10 {q[0] * 1e3:.3f}, "
            f"p90 {q[-1] * 1e3:.3f}, {len(c)} calls); step median {sm:.3f} s "
            f"({', '.join(f'{x:.2f}' for x in s)}); "
            f"ratio {100 * cm / sm:.4f}%"
        )


if __name__ == "__main__":
    main()
