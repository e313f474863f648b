"""``lightning-peft``: LightningCLI for PEFT fine-tuning of a local transformers model.

``lightning-peft fit`` with no arguments runs the embedded default: LoRA (r=16, α=32 on
query/value) on all-MiniLM-L6-v2 for BBC News topic classification, fully offline. Shortcuts:
``--model DIR`` (= ``--model.model_path``), ``--data FILE`` (= ``--data.path``); ``--method``,
``--rank``, ``--alpha``, ``--targets``, ``--task``; everything else is LightningCLI's
(``--trainer.devices``, ``--trainer.strategy``, ``--trainer.precision``, ``--config``...).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from lightning_peft.callback import PEFTCallback
from lightning_peft.config import AdapterConfig, LoRAConfig
from lightning_peft.curves import CurveRecorder
from lightning_peft.errors import InputError
from lightning_peft.tasks import FineTuneTask
from lightning_peft.text_data import TASKS, TextData

METHODS = ("lora", "dora", "adapter")
SHORTCUTS = {"--model": "--model.model_path", "--data": "--data.path"}
# The usual attention projections of encoder and decoder families, for --targets' default.
DEFAULT_TARGETS = ["query", "value", "q_proj", "v_proj", "c_attn"]


def torch_threads(processes: int = 1) -> int:
    """Threads per process: the CPUs this process may use that are not already busy.

    On a shared 2-core machine two threads ran ~9x slower than one when the other core was
    loaded (oversubscription), so the 1-minute load average is subtracted. Override with
    ``LIGHTNING_PEFT_THREADS``.
    """
    if os.environ.get("LIGHTNING_PEFT_THREADS"):
        return max(1, int(os.environ["LIGHTNING_PEFT_THREADS"]))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    busy = int(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return max(1, (cpus - min(busy, cpus - 1)) // max(1, processes))


def expand_shortcuts(argv: list[str]) -> list[str]:
    """``--model DIR`` -> ``--model.model_path DIR``; ``--data FILE`` -> ``--data.path FILE``."""
    out = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        out.append(SHORTCUTS[name] + eq + value if name in SHORTCUTS else arg)
    return out


def build_peft_config(method: str, rank: int, alpha: float, targets, dropout: float):
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "adapter":
        return AdapterConfig(
            bottleneck_dim=rank, target_modules=targets or ["output.dense"], dropout=dropout
        )
    return LoRAConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=targets or DEFAULT_TARGETS,
        lora_dropout=dropout,
        use_dora=method == "dora",
    )


class PEFTCLI(LightningCLI):
    """LightningCLI plus the PEFT options; reports accuracy before and after training."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--method", type=str, default="lora", help="lora | dora | adapter")
        parser.add_argument("--rank", type=int, default=16, help="LoRA rank / adapter width")
        parser.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha")
        parser.add_argument("--dropout", type=float, default=0.05, help="adapter dropout")
        parser.add_argument(
            "--targets",
            type=list[str] | str | None,
            default=None,
            help="module names, a regex, or all-linear",
        )
        parser.add_argument("--task", type=str, default="classification", help=" | ".join(TASKS))
        parser.add_argument("--output_dir", type=str, default="runs/lightning-peft")
        parser.link_arguments("task", "model.task")
        parser.link_arguments("task", "data.task")
        parser.link_arguments("model.model_path", "data.tokenizer_path")
        parser.link_arguments("data.num_labels", "model.num_labels", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.method not in METHODS:
            raise InputError(
                f"unknown method {config.method!r}; choose one of {', '.join(METHODS)}"
            )
        if config.task not in TASKS:
            raise InputError(f"unknown task {config.task!r}; choose one of {', '.join(TASKS)}")
        if config.model.model_path is None:
            from lightning_peft.tasks import default_model_path

            config.model.model_path = config.data.tokenizer_path = default_model_path()
        devices = config.trainer.devices
        processes = devices if isinstance(devices, int) and devices > 0 else 1
        torch.set_num_threads(torch_threads(processes))

    def instantiate_trainer(self, **kwargs):
        config = self.config[self.subcommand] if self.subcommand else self.config
        self.output_dir = Path(config.output_dir)
        peft_config = build_peft_config(
            config.method, config.rank, config.alpha, config.targets, config.dropout
        )
        self.peft_callback = PEFTCallback(peft_config, save_adapter_to=self.output_dir / "adapter")
        self.curves = CurveRecorder()
        extra = [
            self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys
        ]
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        return self._instantiate_trainer(trainer_config, [*extra, self.peft_callback, self.curves])

    def _validate(self) -> dict[str, float]:
        metrics = self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        return {k: float(v) for k, v in metrics[0].items()} if metrics else {}

    def before_fit(self) -> None:
        self.started = time.perf_counter()
        self.before = self._validate()
        _say("held-out before training: " + _format(self.before))

    def after_fit(self) -> None:
        after = self._validate()
        seconds = time.perf_counter() - self.started
        _say("held-out after training:  " + _format(after))
        self._write_outputs(after, seconds)

    @rank_zero_only
    def _write_outputs(self, after: dict[str, float], seconds: float) -> None:
        if getattr(self.model, "head", None) is not None:
            from safetensors.torch import save_file

            head = {
                k: v.detach().cpu().contiguous() for k, v in self.model.head.state_dict().items()
            }
            save_file(head, self.output_dir / "adapter" / "task_head.safetensors")
        plot = self.curves.plot(self.output_dir / "curves.png")
        report = self.peft_callback.report
        summary = {
            "before": self.before,
            "after": after,
            "seconds": round(seconds, 1),
            "trainable_params": report.trainable_params if report else None,
            "total_params": report.total_params if report else None,
            "threads": torch.get_num_threads(),
        }
        (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        _say(f"adapter: {self.output_dir / 'adapter'}  curves: {plot}  ({seconds:.0f} s)")


def _format(metrics: dict[str, float]) -> str:
    parts = []
    if "val_acc" in metrics:
        parts.append(f"accuracy {100 * metrics['val_acc']:.1f}%")
    if "val_loss" in metrics:
        parts.append(f"loss {metrics['val_loss']:.4f}")
    return ", ".join(parts) or "(no metrics)"


@rank_zero_only
def _say(message: str) -> None:
    print(f"lightning-peft: {message}", flush=True)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-peft`` command."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    argv = expand_shortcuts(sys.argv[1:] if args is None else list(args))
    if args is None:  # LightningCLI warns when both sys.argv and args carry arguments
        sys.argv[1:], argv = argv, None
    try:
        PEFTCLI(
            FineTuneTask,
            TextData,
            args=argv,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                "max_epochs": 3,
                "accelerator": "auto",
                "devices": 1,
                "default_root_dir": "runs/lightning-peft",
                "logger": {
                    "class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": "runs/lightning-peft"},
                },
                "log_every_n_steps": 5,
            },
        )
    except InputError as error:
        print(f"lightning-peft: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
