"""``RowGroups``: a batch's rows grouped by adapter, checked once, for every layer of the batch.

A mixed-adapter batch runs the same grouping through every adapted layer (all linear layers of
a transformer: hundreds per forward). ``mixed_lora_linear`` takes per-row adapter ids and sorts
them in every call; ``grouped_lora_linear`` takes a ``RowGroups`` instead, whose values
(offsets monotone and in range, rows a permutation) were read once, when it was made, and
whose tensors must not change afterwards (their version counters are compared on each use).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from peft_kernels._validation import _elsewhere, _not_a_tensor
from peft_kernels.torch_grouped import group_all

__all__ = ["RowGroups", "check_group_index"]


def check_group_index(
    group_index: Tensor, num_groups: int, name: str = "group_index", scaling: Tensor | None = None
) -> None:
    """Per-row group ids (N,) in [0, num_groups) or -1 (and, given, finite ``scaling``): the
    values are read eagerly in one host sync, not under ``torch.compile``."""
    if not isinstance(group_index, Tensor):
        _not_a_tensor(name, group_index)
    dtype = group_index.dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {group_index.dtype}")
    if group_index.dim() != 1:
        raise ValueError(f"{name} must be 1-D (N,), got shape {tuple(group_index.shape)}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 0:
        raise ValueError(f"num_groups must be an int >= 0, got {num_groups!r}")
    if torch.compiler.is_compiling():
        return
    checks = [((group_index >= -1) & (group_index < num_groups)).all()]
    if scaling is not None:
        checks.append(torch.isfinite(scaling).all())
    ids_ok, *scaling_ok = torch.stack(checks).tolist()
    if not ids_ok:
        raise ValueError(
            f"{name} values must be in [0, {num_groups}) or -1 (no group); got values "
            f"from {int(group_index.min())} to {int(group_index.max())}"
        )
    if not all(scaling_ok):
        raise ValueError(f"scaling must be finite, got {scaling.tolist()}")


@dataclass(frozen=True, eq=False)
class RowGroups:
    """N rows in K groups: ``rows`` sorts them by group, ``offsets`` ends each group.

    Attributes:
        offsets: (K,) int64, the cumulative ENDS of the groups in the ordered rows
            (``torch._grouped_mm``'s ``offs``): group k = ordered rows
            ``[offsets[k-1], offsets[k])``; the ordered rows past ``offsets[-1]`` are in no group.
        rows: (N,) int64, a permutation of the N rows (the ordered rows are ``x[rows]``), or None:
            the rows are in group order already (no gather, no scatter).
        n_rows: N.

    Made, the values are checked in one host sync (eagerly); ``check_unchanged`` then refuses
    tensors changed in place since (except inference tensors, made under
    ``torch.inference_mode``: they have no version counter). ``RowGroups.from_index`` builds
    one from per-row ids.

    Raises:
        TypeError / ValueError: non-tensors, dtypes, shapes, devices, offsets not monotone or
            past N, rows not a permutation of the N rows.
    """

    offsets: Tensor
    rows: Tensor | None
    n_rows: int
    _versions: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        offsets, rows, n_rows = self.offsets, self.rows, self.n_rows
        if not isinstance(offsets, Tensor):
            _not_a_tensor("offsets", offsets)
        if rows is not None and not isinstance(rows, Tensor):
            _not_a_tensor("rows", rows)
        if isinstance(n_rows, bool) or not isinstance(n_rows, int) or n_rows < 0:
            raise ValueError(f"n_rows must be an int >= 0, got {n_rows!r}")
        if offsets.dtype != torch.int64 or offsets.dim() != 1:
            raise TypeError(
                f"offsets must be 1-D int64 (K,), got {offsets.dtype} of shape "
                f"{tuple(offsets.shape)}"
            )
        if rows is not None:
            if rows.dtype != torch.int64 or rows.shape != (n_rows,):
                raise TypeError(
                    f"rows must be int64 (N,) = ({n_rows},), got {rows.dtype} of shape "
                    f"{tuple(rows.shape)}"
                )
            if rows.device != offsets.device:
                _elsewhere("rows", rows, offsets.device)
        if not torch.compiler.is_compiling():
            self._check_values()
        object.__setattr__(self, "_versions", self._current_versions())

    @classmethod
    def from_index(cls, group_index: Tensor, num_groups: int) -> RowGroups:
        """The groups of per-row ids ``group_index`` (N,) (values in [0, num_groups) or -1: no
        group, those rows last), sorted stably; ``rows`` is None when the ids are in order
        already (-1 counting as last). One host sync for the check, one for the order."""
        check_group_index(group_index, num_groups)
        rows, offsets = group_all(group_index, num_groups)
        key = torch.where(group_index < 0, num_groups, group_index)
        in_order = bool((key[1:] >= key[:-1]).all())
        return cls(offsets, None if in_order else rows, group_index.shape[0])

    @property
    def device(self) -> torch.device:
        return self.offsets.device

    def check_unchanged(self) -> None:
        """Refuse tensors changed in place since this was made (their checks would be stale)."""
        if self._current_versions() != self._versions:
            raise ValueError(
                "this RowGroups' offsets or rows were changed in place after it was made; make "
                "a new RowGroups (its values are checked when it is made)"
            )

    def _current_versions(self) -> tuple[int | None, ...]:
        tensors = (self.offsets,) if self.rows is None else (self.offsets, self.rows)
        # an inference tensor (made under torch.inference_mode) has no version counter
        return tuple(None if t.is_inference() else t._version for t in tensors)

    def _check_values(self) -> None:
        offsets, rows, n_rows = self.offsets, self.rows, self.n_rows
        checks = []
        if offsets.numel():
            checks += [offsets[0] >= 0, (offsets[1:] >= offsets[:-1]).all(), offsets[-1] <= n_rows]
        if rows is not None and n_rows:
            in_range = ((rows >= 0) & (rows < n_rows)).all()
            once = (torch.bincount(rows.clamp(0, n_rows - 1), minlength=n_rows) == 1).all()
            checks.append(in_range & once)
        if not checks:
            return
        passed = torch.stack(checks).tolist()
        if offsets.numel() and not all(passed[:3]):
            raise ValueError(
                "offsets must be the non-decreasing cumulative ends of the groups, from >= 0 to "
                f"<= N = {n_rows}, got {offsets.tolist()}"
            )
        if not passed[-1]:
            raise ValueError(f"rows must be a permutation of the {n_rows} rows (each once)")
