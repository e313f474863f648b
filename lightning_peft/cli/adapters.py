"""``lightning-peft fit --adapters NAME[=FILE],... --adapter_column COLUMN``: several named
adapters trained in one run, each row of the data training the adapter its column names.

``NAME`` alone takes the config the method options build (``--method``, ``--rank``, ...);
``NAME=FILE`` reads it from FILE, an ``adapter_config.json`` (peft's or ours) or a directory
holding one. ``COLUMN`` is a column of ``--data FILE`` (``label`` for the embedded BBC News
data) whose value in each row is one of the names, or ``__base__`` (the row trains no adapter).
Every check runs before a model is loaded: names, files, the method (one for all; one that
holds named adapters), the column (present, every value a name).
"""

from __future__ import annotations

from pathlib import Path

from lightning_peft.core.adapter import AdapterConfigLike
from lightning_peft.core.errors import InputError
from lightning_peft.lightning.multi_adapter import checked_adapters
from lightning_peft.model.sites import BASE_ROWS
from lightning_peft.peft_format.files import CONFIG_NAME, read_config


def parse_adapters(text: str, default: AdapterConfigLike | None) -> dict[str, AdapterConfigLike]:
    """``{name: config}`` from ``--adapters``' value (``default``: the method options' config,
    for names without a file).

    Raises:
        InputError: an empty entry, a name given twice, an invalid name, a file that is not an
            adapter config, configs of several methods or of a method that holds one adapter.
    """
    adapters: dict[str, AdapterConfigLike] = {}
    for entry in text.split(","):
        name, eq, file = (part.strip() for part in entry.partition("="))
        if not name or (eq and not file):
            raise InputError(f"--adapters: {entry!r} is not NAME or NAME=FILE")
        if name in adapters:
            raise InputError(f"--adapters: {name!r} is given twice")
        adapters[name] = _read(name, Path(file)) if eq else default
    try:
        return checked_adapters(adapters)
    except (TypeError, ValueError) as error:
        raise InputError(f"--adapters: {' '.join(str(error).split())}") from None


def _read(name: str, path: Path) -> AdapterConfigLike:
    directory = path.parent if path.name == CONFIG_NAME or path.is_file() else path
    if path.is_file() and path.name != CONFIG_NAME:
        raise InputError(f"--adapters {name}={path}: give an {CONFIG_NAME} or its directory")
    try:
        return read_config(directory)
    except (OSError, ValueError) as error:
        raise InputError(f"--adapters {name}={path}: {' '.join(str(error).split())}") from None


def check_adapter_column(records: list[dict], column: str, names: list[str], source: str) -> None:
    """Every row names one of ``names`` (or ``__base__``) in ``column``.

    Raises:
        InputError: the column is missing, or a row names another adapter (the first such,
            with how many rows do).
    """
    if records and column not in records[0]:
        raise InputError(
            f"--adapter_column {column!r}: {source} has no such column (columns: "
            f"{', '.join(map(str, records[0]))})"
        )
    allowed = {*names, BASE_ROWS}
    unknown = [r[column] for r in records if r.get(column) not in allowed]
    if unknown:
        raise InputError(
            f"--adapter_column {column!r}: {len(unknown)} rows of {source} name an adapter that "
            f"--adapters does not give, e.g. {unknown[0]!r} (adapters: {', '.join(names)}; "
            f"{BASE_ROWS!r} for a row without adapter)"
        )
