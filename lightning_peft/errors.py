"""The error type for bad user input."""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input (a file, a directory, an option): the command line prints it as one line
    and exits with status 2. Raised before any work is done."""
