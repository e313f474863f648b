"""Saving the adapter at the end of a run, with a fallback directory when the target cannot be
written."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_peft.core.errors import DivergenceError, NonFiniteError
from lightning_peft.peft_format.files import save_adapter

FALLBACK_NAME = "peft_adapter_fallback"


def save_or_fall_back(
    pl_module: nn.Module,
    directory: Path,
    state: dict[str, Tensor],
    run_dir: Path,
    overwrite: bool,
    allow_non_finite: bool = False,
) -> None:
    """``save_adapter`` to ``directory``; if that fails, to a new directory in ``run_dir``, and
    raise naming both: the trained adapter is never lost."""
    try:
        save_adapter(
            pl_module,
            directory,
            state_dict=state,
            overwrite=overwrite,
            allow_non_finite=allow_non_finite,
        )
        rank_zero_info(f"PEFTCallback: adapter written to {directory}")
        return
    except NonFiniteError as error:  # no fallback either: a non-finite adapter is never written
        raise DivergenceError(
            f"PEFTCallback: training ended with a non-finite adapter: {error.detail}. It was not "
            f"written to {directory} (nor anywhere else); check_finite=False writes it anyway"
        ) from error
    except Exception as error:
        failure = error
    fallback = new_path(run_dir / FALLBACK_NAME)
    try:
        save_adapter(pl_module, fallback, state_dict=state, allow_non_finite=allow_non_finite)
    except Exception as second:
        raise RuntimeError(
            f"PEFTCallback could not write the trained adapter to {directory} ({failure}) nor "
            f"to {fallback} ({second}): it exists only in memory; save it with "
            "save_adapter(model, directory)"
        ) from failure
    raise RuntimeError(
        f"PEFTCallback could not write the trained adapter to {directory} ({failure}); it was "
        f"written to {fallback} instead"
    ) from failure


def new_path(path: Path) -> Path:
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate
