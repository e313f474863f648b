"""Which layer shapes a sweep visits, and how many rounds it times, per device and profile.

A sweep point is ``(method, M, in, out, r, dropout_p)``; the dtype and device come from the
command line. The default sweeps contain the target points (CPU: M=2048 and M=512 at
in=out=2048, r=16; CUDA: M=8192, in=out=4096, r=16), a rank sweep, an M sweep and one LoRA
dropout point (to show the memory dropout costs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from benchmarks.common import METHODS, CaseSpec


@dataclass(frozen=True)
class SweepPoint:
    """One layer shape: x (rows, in_features) -> y (rows, out_features), rank ``rank``."""

    method: str
    rows: int
    in_features: int
    out_features: int
    rank: int
    dropout_p: float = 0.0

    def spec(self, dtype: torch.dtype, device: str) -> CaseSpec:
        return CaseSpec(
            method=self.method,
            rows=self.rows,
            in_features=self.in_features,
            out_features=self.out_features,
            rank=self.rank,
            dtype=dtype,
            device=device,
            dropout_p=self.dropout_p,
        )


@dataclass(frozen=True)
class SweepPlan:
    """The points and the timing effort of one run."""

    points: tuple[SweepPoint, ...]
    repeats: int  # interleaved rounds per point and mode
    warmup: int  # untimed calls per implementation before the rounds
    min_sample_s: float  # calls per sample are calibrated to last at least this long


def _grid(
    rows: int,
    features: int,
    rank: int,
    ranks: tuple[int, ...],
    more_rows: tuple[int, ...],
    dropout_p: float,
) -> tuple[SweepPoint, ...]:
    """Per method: the target point, its rank sweep, its M sweep; plus one LoRA dropout point."""
    points: list[SweepPoint] = []
    for method in METHODS:
        shapes = {(rows, rank)}
        shapes |= {(rows, r) for r in ranks}
        shapes |= {(m, rank) for m in more_rows}
        for m, r in sorted(shapes, key=lambda shape: (-shape[0], shape[1])):
            points.append(SweepPoint(method, m, features, features, r))
    points.append(SweepPoint("lora", rows, features, features, rank, dropout_p))
    return tuple(points)


def _cpu_grid() -> tuple[SweepPoint, ...]:
    """M=2048 and M=512 at 2048² r=16, ranks 8/16/64 at M=512, LoRA p=0.1 at M=512."""
    return _grid(rows=512, features=2048, rank=16, ranks=(8, 64), more_rows=(2048,), dropout_p=0.1)


def _cuda_grid() -> tuple[SweepPoint, ...]:
    """M=8192 at 4096² with r in 8/16/64, M=2048 at r=16, LoRA p=0.1 at M=8192 r=16."""
    return _grid(rows=8192, features=4096, rank=16, ranks=(8, 64), more_rows=(2048,), dropout_p=0.1)


def _quick_grid() -> tuple[SweepPoint, ...]:
    """Tiny shapes (seconds on one thread): two ranks, two M, one LoRA dropout point."""
    return _grid(rows=64, features=96, rank=4, ranks=(8,), more_rows=(128,), dropout_p=0.1)


def sweep_plan(device_type: str, quick: bool, repeats: int | None = None) -> SweepPlan:
    """The plan for ``device_type`` ("cpu" | "cuda"); ``repeats`` overrides the default rounds.

    CPU rounds are few because one fwd+bwd at M=2048, 2048² takes ~0.2-0.4 s on 2 cores:
    the default sweep is ~9 points x 2 modes x 4 implementations x (warmup + rounds).
    """
    if quick:
        plan = SweepPlan(_quick_grid(), repeats=5, warmup=1, min_sample_s=0.002)
    elif device_type == "cuda":
        plan = SweepPlan(_cuda_grid(), repeats=25, warmup=3, min_sample_s=0.02)
    else:
        plan = SweepPlan(_cpu_grid(), repeats=12, warmup=1, min_sample_s=0.0)
    if repeats is not None:
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        plan = SweepPlan(plan.points, repeats, plan.warmup, plan.min_sample_s)
    return plan
