"""The error types the command line reports as one line."""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input (a file, a directory, an option): the command line prints it as one line
    and exits with status 2. Raised before any work is done."""


class DivergenceError(RuntimeError):
    """Training produced a NaN or an infinity (in the loss or the trained gradients), or ended
    with non-finite trained tensors: ``fit`` stops, and no such adapter is written. The command
    line prints it as one line and exits with status 1 (the run started: not a usage error)."""


class NonFiniteError(ValueError):
    """``save_adapter`` was asked to write tensors that hold NaN or infinity (and was not told
    ``allow_non_finite=True``). Raised before anything is written; ``detail`` names the first
    such tensor and counts its non-finite values."""

    detail: str = ""
