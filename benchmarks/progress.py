"""A progress bar on stderr: tqdm when it imports, else a plain counter."""

from __future__ import annotations

import sys
from typing import Protocol


class Progress(Protocol):
    def update(self, steps: int = 1) -> None: ...
    def set_description(self, text: str) -> None: ...
    def close(self) -> None: ...


class _Counter:
    """``[done/total] description`` rewritten in place on stderr."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.text = total, 0, ""

    def _show(self) -> None:
        sys.stderr.write(f"\r[{self.done}/{self.total}] {self.text}\033[K")
        sys.stderr.flush()

    def update(self, steps: int = 1) -> None:
        self.done += steps
        self._show()

    def set_description(self, text: str) -> None:
        self.text = text
        self._show()

    def close(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()


def progress_bar(total: int, enabled: bool = True) -> Progress:
    """A bar counting ``total`` steps (tqdm if available); ``enabled=False`` shows nothing."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _Counter(total) if enabled else _Silent()
    return tqdm(total=total, file=sys.stderr, unit="round", dynamic_ncols=True, disable=not enabled)


class _Silent:
    def update(self, steps: int = 1) -> None:
        pass

    def set_description(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass
