"""Where a run happens: thread count, device name, library versions, date; and the CSV + JSON
files a run writes."""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_run_arguments(
    parser: argparse.ArgumentParser, *, model_source: bool, dtypes: Sequence[str] = tuple(DTYPES)
) -> None:
    """The options every whole-model benchmark shares: where the model comes from (``--model``,
    ``--random-weights`` or ``--quick``, with ``model_source``), ``--device``, ``--dtype`` (one
    of ``dtypes``; default bf16 on CUDA, else fp32) and ``--threads``."""
    if model_source:
        source = parser.add_mutually_exclusive_group()
        source.add_argument("--model", type=Path, help="a transformers causal-LM directory")
        source.add_argument(
            "--random-weights",
            action="store_true",
            help="SmolLM2-135M's shape with random weights (no model files needed)",
        )
        source.add_argument("--quick", action="store_true", help="a tiny random Llama, 2 rounds")
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", choices=tuple(dtypes), help="default: bf16 on cuda, else fp32")
    parser.add_argument("--threads", type=int, default=usable_cpus(), help="torch CPU threads")


def check_run_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``parser.error`` for what ``add_run_arguments`` took and this machine cannot do: CUDA
    without a device, CPU time on CUDA (``--clock``), a ``--model`` folder without config."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.device == "cuda" and getattr(args, "clock", "wall") == "cpu":
        parser.error("--clock cpu times CPU work; CUDA runs are timed with CUDA events")
    model = getattr(args, "model", None)
    if model is not None and not (model / "config.json").is_file():
        parser.error(f"--model {model}: no config.json there (not a transformers directory)")


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """``torch.set_num_threads(count)`` for the duration, restoring the previous count."""
    if count < 1:
        raise ValueError(f"threads must be >= 1, got {count}")
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    """E.g. ``NVIDIA H200`` or the CPU model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_metadata(device: torch.device, dtype: torch.dtype, threads: int) -> dict[str, object]:
    """What a result file records about the run (JSON-serialisable)."""
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": threads,
        "usable_cpus": usable_cpus(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "peft": _version("peft"),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def file_stem(metadata: dict[str, object]) -> str:
    """``<date>_<device>``, e.g. ``20250101-120000_cuda-NVIDIA-H200`` (file-name safe)."""
    date = dt.datetime.fromisoformat(str(metadata["date"])).strftime("%Y%m%d-%H%M%S")
    device = str(metadata["device"])
    if device == "cuda":
        device = f"{device}-{metadata['device_name']}"
    return f"{date}_{re.sub(r'[^A-Za-z0-9.-]+', '-', device).strip('-')}"


def write_csv_json(
    rows: Sequence[Mapping[str, object]],
    metadata: Mapping[str, object],
    out_dir: Path,
    stem: str,
    fields: Sequence[str],
    metadata_fields: Sequence[str],
) -> tuple[Path, Path]:
    """``<stem>.csv`` and ``<stem>.json`` in ``out_dir``.

    The CSV has one line per row (``fields``), with ``metadata_fields`` repeated on each; the
    JSON holds ``{"metadata": ..., "rows": [...]}``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.json"
    run_fields = {key: metadata.get(key) for key in metadata_fields}
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=(*fields, *metadata_fields))
        writer.writeheader()
        writer.writerows({**row, **run_fields} for row in rows)
    json_path.write_text(
        json.dumps({"metadata": dict(metadata), "rows": list(rows)}, indent=1) + "\n",
        encoding="utf-8",
    )
    return csv_path, json_path
