"""``lightning-peft``: LightningCLI for PEFT fine-tuning of a local transformers model.

``lightning-peft fit`` with no arguments runs the embedded default, fully offline: LoRA (r=16,
α=32 on every linear layer) on SmolLM2-135M-Instruct, taught to answer "which topic is this BBC
News article about?" with the topic (``--task instruct``). ``--task classification`` is the
BERT demo (all-MiniLM-L6-v2 with a head on the same articles). Shortcuts: ``--model DIR``
(= ``--model.model_path``), ``--data FILE`` (= ``--data.path``); the method options
(``--method``, ``--rank``, ``--alpha``, ``--dropout``, ``--targets``, ``--feedforward``,
``--virtual_tokens``, ``--prompt_init``: each method's ``cli`` module), ``--quantize``,
``--task``, ``--output_dir``, ``--overwrite``; everything else is LightningCLI's
(``--trainer.devices``, ``--trainer.precision``, ``--config``...). ``lightning-peft inspect
ADAPTER_DIR`` reports an adapter's spectra (``lightning_peft.peft_format.spectrum``).

A user error (a bad option, file or directory) prints one line, ``lightning-peft: error: ...``,
and exits with status 2, before any training. A run that diverges (a NaN or an infinity in the
loss or the adapters' gradients: ``DivergenceError``) prints one line of the same form and exits
with status 1: the run started and failed, as opposed to a command to fix before it starts
(``--check_finite false`` turns the check off). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import torch
from jsonargparse import ActionYesNo, Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from lightning_peft.cli.adapters import check_adapter_column, parse_adapters
from lightning_peft.cli.curves import CurveRecorder
from lightning_peft.cli.data import TASKS, TextData, check_data_file, read_bbc_news, read_records
from lightning_peft.cli.methods import (
    MethodOptions,
    describe,
    method_choices,
    method_lr,
    option_specs,
    targets_help,
)
from lightning_peft.cli.tasks import FineTuneTask, check_model_dir, default_model_path
from lightning_peft.core.errors import DivergenceError, InputError
from lightning_peft.lightning.callback import PEFTCallback
from lightning_peft.lightning.precision import QUANTIZE_MODES, bitsandbytes_config
from lightning_peft.methods.registry import method_for
from lightning_peft.model.injection import plan_injection
from lightning_peft.model.sites import DEFAULT_NAME
from lightning_peft.model.targeting import plan_targets
from lightning_peft.peft_format.files import CONFIG_NAME, WEIGHTS_NAME, adapter_directory
from lightning_peft.peft_format.spectrum import main as inspect_main

SHORTCUTS = {"--model": "--model.model_path", "--data": "--data.path"}
DEFAULT_OUTPUT_DIR = "runs/lightning-peft"
DEFAULT_EPOCHS = {"instruct": 1, "classification": 3, "causal-lm": 1}
CHECKPOINT_ALIASES = ("last", "best", "hpc", "registry")
DESCRIPTION = (
    "PEFT fine-tuning (LoRA, DoRA, bottleneck adapters, IA³, prompt tuning; QLoRA with "
    "--quantize) of a local transformers model. "
    "`lightning-peft fit` runs the embedded demo (SmolLM2-135M-Instruct, BBC News topics); "
    "`lightning-peft inspect ADAPTER_DIR [--model DIR]` reports the singular values of an "
    "adapter's updates."
)


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


def check_output_dir(output_dir: str | Path, overwrite: bool, adapters=None) -> Path:
    """Prove that ``output_dir`` can be created and written (a file is written and removed;
    directories created for the test are removed again, so a refused run leaves nothing), and
    refuse to replace an adapter in ``output_dir/adapter`` (with ``adapters``, in the directory
    of each, peft's layout) without ``overwrite``.

    Raises:
        InputError: not a directory, cannot be created or written, or holds an adapter.
    """
    output_dir = Path(output_dir)
    for name in adapters or [DEFAULT_NAME]:
        adapter = adapter_directory(output_dir / "adapter", name)
        held = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if (adapter / n).exists()]
        if held and not overwrite:
            raise InputError(
                f"{adapter} already holds an adapter ({held[0]}); pass --overwrite to replace "
                "it, or choose another --output_dir"
            )
    created = [p for p in (output_dir, *output_dir.parents) if not p.exists()]
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-test-"):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise InputError(f"--output_dir {output_dir} is not writable: {reason}") from None
    finally:
        for directory in created:  # deepest first
            if directory.is_dir():
                directory.rmdir()
    return output_dir


def _skeleton(config, auto, quantize: str | None = None):
    """A weightless copy (meta device) of the model ``config`` describes; with ``quantize``, the
    layers swapped for bitsandbytes' ones as ``from_pretrained`` swaps them (transformers' own
    quantizer decides which: every linear layer but the output layer, for instance)."""
    with torch.device("meta"):
        skeleton = auto.from_config(config)
    if quantize is not None:
        from transformers.quantizers import AutoHfQuantizer

        quantizer = AutoHfQuantizer.from_config(bitsandbytes_config(quantize), pre_quantized=False)
        quantizer.preprocess_model(skeleton, device_map="cpu")
    return skeleton


def check_targets(
    model_path: str,
    task: str,
    peft_config,
    *,
    quantize: str | None = None,
    options: MethodOptions | None = None,
) -> None:
    """The adapter config fits this model: every check injection makes, run on a weightless
    copy (meta device) built from ``config.json``, before anything is loaded or trained. With
    ``quantize`` the targets are also planned on the copy quantized as the real load will be,
    so a method without a layer for bitsandbytes' layers is refused here.

    Raises:
        InputError: an unreadable config, targets that select nothing (or the wrong layers), a
            ``--feedforward`` that selects none of the targets, a quantized target the method
            cannot adapt, a ``--prompt_init`` the model's tokenizer cannot read.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"{model_path}/config.json cannot be read: {_first_line(error)}") from None
    auto = AutoModel if task == "classification" else AutoModelForCausalLM
    command_line = method_for(peft_config).command_line
    option = command_line.target_option if command_line is not None else "--targets"
    try:
        targets = plan_injection(_skeleton(config, auto), peft_config).targets.names
    except ValueError as error:
        raise InputError(f"{option}: {_one_line(error)}") from None
    if options is not None and command_line is not None and command_line.check_plan:
        command_line.check_plan(peft_config, targets, options.values())
    if quantize is not None:
        try:
            plan_targets(_skeleton(config, auto, quantize), peft_config)
        except ValueError as error:
            raise InputError(
                f"--quantize {quantize}: {_one_line(error)} (the quantized model's linear layers "
                "are bitsandbytes layers; --method lora and dora adapt them)"
            ) from None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def check_quantize(mode: str | None) -> None:
    """``--quantize``: None, or a mode with bitsandbytes installed.

    Raises:
        InputError: an unknown mode; ``MissingExtraError`` (an ``InputError``) naming the extra.
    """
    if mode is None:
        return
    if mode not in QUANTIZE_MODES:
        raise InputError(
            f"--quantize must be one of {', '.join(QUANTIZE_MODES)} (or left out: no "
            f"quantization), got {mode!r}"
        )
    bitsandbytes_config(mode)  # imports bitsandbytes


def check_ckpt_path(ckpt_path: str | None) -> None:
    """A ``--ckpt_path`` that exists and reads as a Lightning checkpoint (or one of Lightning's
    names: last, best, hpc, registry). A file is opened lazily (``mmap``), not loaded.

    Raises:
        InputError: missing, empty, truncated, or not a checkpoint.
    """
    if ckpt_path is None or ckpt_path in CHECKPOINT_ALIASES:
        return
    path = Path(ckpt_path)
    if not path.exists():
        raise InputError(f"--ckpt_path {ckpt_path} does not exist")
    if path.is_dir():  # a distributed (sharded) checkpoint
        if not any(path.iterdir()):
            raise InputError(f"--ckpt_path {ckpt_path} is an empty directory")
        return
    if not zipfile.is_zipfile(path):
        raise InputError(
            f"--ckpt_path {ckpt_path} is not a readable checkpoint: not a complete torch.save "
            "file (truncated, or not a checkpoint)"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # any failure to read is the file's
        if "Weights only load failed" in str(error):
            return  # intact, but holds objects: Lightning loads it with --weights_only false
        raise InputError(
            f"--ckpt_path {ckpt_path} is not a readable checkpoint: {type(error).__name__}: "
            f"{_first_line(error)}"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise InputError(f"--ckpt_path {ckpt_path} is not a Lightning checkpoint (no state_dict)")


class OneLineErrorParser(LightningArgumentParser):
    """Parse errors as one line, ``lightning-peft: error: ...``, and exit status 2."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            return super().error(message, ex)
        text = " ".join(str(message).split())
        sys.stderr.write(f"lightning-peft: error: {text} (see --help)\n")
        self.exit(2)


class PEFTCLI(LightningCLI):
    """LightningCLI plus the PEFT options; reports the held-out metrics before and after
    training and (instruct) answers to held-out prompts before and after."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--method",
            type=str,
            default="lora",
            help=" | ".join(method_choices()) + " (dora: LoRA with DoRA's magnitude; adapter: "
            "bottleneck adapters). An option the method does not take is refused",
        )
        for name, declared in option_specs().items():  # each method's options, each once
            _, first = declared[0]
            texts: dict[str, list[str]] = {}  # one help text, the methods that declare it
            for choices, option in declared:
                text = option.help
                if isinstance(option.default, float):
                    text += f" (default {option.default:g})"
                elif isinstance(option.default, int):
                    text += f" (default {option.default})"
                texts.setdefault(text, []).extend(choices)
            text = "; ".join(f"{'/'.join(choices)}: {text}" for text, choices in texts.items())
            if name == "targets":
                text = targets_help()
            parser.add_argument(f"--{name}", type=first.type, default=None, help=text)
        parser.add_argument(
            "--quantize",
            type=str | None,
            default=None,
            help=f"{' | '.join(QUANTIZE_MODES)}: load the base model quantized by bitsandbytes "
            "(QLoRA with lora/dora; needs pip install lightning-peft[qlora]). Default: float32",
        )
        parser.add_argument(
            "--task",
            type=str,
            default="instruct",
            help="instruct (a causal LM answers with the label) | classification (an encoder "
            "with a head) | causal-lm (next-token loss on the text)",
        )
        parser.add_argument(
            "--output_dir",
            type=str,
            default=DEFAULT_OUTPUT_DIR,
            help="everything the run writes: adapter/, curves.png, summary.json, "
            "lightning_logs/ (metrics, config, checkpoints)",
        )
        parser.add_argument(
            "--overwrite",
            action=ActionYesNo,
            default=False,
            help="replace an adapter already in OUTPUT_DIR/adapter (else the run is refused)",
        )
        parser.add_argument(
            "--check_finite",
            type=bool,
            default=True,
            help="stop at the first NaN or infinity in the loss or the adapters' gradients (one "
            "line naming the step, the tensor and the last finite checkpoint; exit status 1) and "
            "never write a non-finite adapter; false: no check, as in Lightning",
        )
        parser.add_argument(
            "--samples", type=int, default=3, help="instruct: held-out answers shown before/after"
        )
        parser.add_argument(
            "--adapters",
            type=str | None,
            default=None,
            help="NAME[=FILE],...: several named adapters trained in one run, each on the rows "
            "that --adapter_column gives it (FILE: an adapter_config.json or its directory; "
            "without: the method options' config); written to OUTPUT_DIR/adapter in peft's "
            "layout (default there, others in adapter/NAME)",
        )
        parser.add_argument(
            "--adapter_column",
            type=str | None,
            default=None,
            help="with --adapters: the data column naming each row's adapter (__base__: none)",
        )
        parser.link_arguments("task", "model.task")
        parser.link_arguments("quantize", "model.quantize")
        parser.link_arguments("task", "data.task")
        parser.link_arguments("adapter_column", "data.adapter_column")
        parser.link_arguments("output_dir", "trainer.default_root_dir")
        parser.link_arguments("model.model_path", "data.tokenizer_path")
        parser.link_arguments("data.num_labels", "model.num_labels", apply_on="instantiate")
        parser.link_arguments(
            "data.choice_token_ids", "model.choice_token_ids", apply_on="instantiate"
        )
        for option, metavar, text in (
            ("--model", "DIR", "a local transformers model directory (= --model.model_path; "
             "default: the task's embedded model)"),
            ("--data", "FILE", "a CSV/TSV/JSONL file with text and label columns "
             "(= --data.path; default: BBC News)"),
        ):  # fmt: skip
            action = parser._option_string_actions.get(option)
            if action is not None:  # jsonargparse's group option, reached only via shortcuts
                action.help, action.metavar = text, metavar

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Parse, then check every option, directory and file that needs no model: before
        LightningCLI reads a checkpoint, seeds or builds anything."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        check_ckpt_path(config.get("ckpt_path"))
        if config.task not in TASKS:
            raise InputError(f"unknown task {config.task!r}; choose one of {', '.join(TASKS)}")
        if config.data.path is not None:  # its bytes, before a model is located or converted
            check_data_file(config.data.path)
        options = MethodOptions.from_namespace(config)
        options.check()  # before a default model is located (the first time, converted)
        if config.samples < 0:
            raise InputError(f"--samples must be >= 0, got {config.samples}")
        check_quantize(config.quantize)
        if config.model.model_path is None:
            config.model.model_path = config.data.tokenizer_path = default_model_path(config.task)
        check_model_dir(config.model.model_path)
        self.peft_config = options.build(config.task, config.model.model_path)
        self.adapters = self._adapters(config, options)
        if self.adapters is not None:
            self.peft_config = next(iter(self.adapters.values()))
        if config.model.lr is None:  # the method's own default, else the task's (FineTuneTask)
            config.model.lr = method_lr().get(options.method)
        for peft_config in self.adapters.values() if self.adapters else [self.peft_config]:
            check_targets(
                config.model.model_path,
                config.task,
                peft_config,
                quantize=config.quantize,
                options=options,
            )
        self.output_dir = check_output_dir(config.output_dir, config.overwrite, self.adapters)
        logger = config.trainer.logger
        if isinstance(logger, Namespace) and logger.get("init_args", {}).get("save_dir") == (
            DEFAULT_OUTPUT_DIR
        ):
            logger.init_args.save_dir = str(self.output_dir)
        if config.trainer.max_epochs is None and config.trainer.max_steps in (None, -1):
            config.trainer.max_epochs = DEFAULT_EPOCHS[config.task]

    def _adapters(self, config: Namespace, options: MethodOptions) -> dict | None:
        """``--adapters`` and ``--adapter_column``, checked against the data (a file's rows, or
        the embedded data's), before a model is loaded."""
        if config.adapters is None:
            if config.adapter_column is not None:
                raise InputError("--adapter_column names each row's adapter: give --adapters too")
            return None
        if config.adapter_column is None:
            raise InputError(
                "--adapters needs --adapter_column (the column naming each row's adapter)"
            )
        adapters = parse_adapters(config.adapters, self.peft_config)
        if all(value is not self.peft_config for value in adapters.values()) and options.given():
            raise InputError(
                f"--{options.given()[0]} applies to adapters given without a FILE; every adapter "
                "in --adapters has its file"
            )
        if config.data.path is not None:
            label = config.data.label_column if config.task != "causal-lm" else None
            records = read_records(
                config.data.path, config.data.text_column, label, config.adapter_column
            )
            source = config.data.path
        else:
            records, source = read_bbc_news(), "the embedded BBC News data"
        check_adapter_column(records, config.adapter_column, list(adapters), source)
        return adapters

    def _config(self) -> Namespace:
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        devices = self._config().trainer.devices
        processes = devices if isinstance(devices, int) and devices > 0 else 1
        torch.set_num_threads(torch_threads(processes))

    def instantiate_trainer(self, **kwargs):
        self.peft_callback = PEFTCallback(
            None if self.adapters else self.peft_config,
            adapters=self.adapters,
            save_adapter_to=self.output_dir / "adapter",
            overwrite=self._config().overwrite,  # checked before the run: refused or asked for
            verbose=False,
            check_finite=self._config().check_finite,
        )
        self.curves = CurveRecorder()
        extra = [
            self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys
        ]
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        return self._instantiate_trainer(trainer_config, [*extra, self.peft_callback, self.curves])

    # -- fit: before and after ------------------------------------------------------------------

    def _validate(self, ckpt_path: str | None = None) -> dict[str, float]:
        metrics = self.trainer.validate(
            self.model, datamodule=self.datamodule, ckpt_path=ckpt_path, verbose=False
        )
        return {k: float(v) for k, v in metrics[0].items()} if metrics else {}

    def _sample_prompts(self) -> list[dict]:
        config = self._config()
        if self.datamodule.prompt is None or config.samples == 0:
            return []
        prompt = self.datamodule.prompt
        return [
            {"text": r["text"], "label": r["label"], "ids": prompt.prompt_ids(r["text"])}
            | ({"adapter": r[config.adapter_column]} if self.adapters else {})
            for r in self.datamodule.held_out()[: config.samples]
        ]

    def _answers(self) -> list[str]:
        prompts = [s["ids"] for s in self.samples]
        if not prompts:
            return []
        names = [s["adapter"] for s in self.samples] if self.adapters else None
        return self.model.generate_answers(prompts, self.datamodule.tokenizer(), names)

    def before_fit(self) -> None:
        self.started = time.perf_counter()
        config = self._config()
        ckpt_path = config.get("ckpt_path")
        _say(self._run_line())
        self.before = self._validate(ckpt_path)
        report = self.peft_callback.report
        if report is not None:
            _say(
                f"trainable: {report.trainable_params:,} of {report.total_params:,} parameters "
                f"({100 * report.trainable_fraction:.3f}%) in {len(report.modules)} adapted "
                f"module{'s' * (len(report.modules) != 1)} "
                f"({self.output_dir / 'adapted_modules.txt'})"
            )
            _write_text(self.output_dir / "adapted_modules.txt", str(report) + "\n")
        which = f" (restored from {ckpt_path})" if ckpt_path else ""
        _say(f"held-out before training{which}: " + _format(self.before))
        self.samples = self._sample_prompts()
        for sample, answer in zip(self.samples, self._answers(), strict=True):
            sample["before"] = answer

    def after_fit(self) -> None:
        last = self.curves.val[-1] if self.curves.val else None
        if last is not None and last[0] == self.trainer.global_step and "val_loss" in last[1]:
            after = last[1]  # the last epoch ended with a validation of these very weights
        else:
            after = self._validate()
        for sample, answer in zip(self.samples, self._answers(), strict=True):
            sample["after"] = answer
        seconds = time.perf_counter() - self.started
        _say("held-out after training:  " + _format(after))
        for i, sample in enumerate(self.samples, start=1):
            headline = sample["text"].strip().splitlines()[0][:60]
            _say(f"sample {i} [{sample['label']}] {headline!r}")
            _say(f"    before: {json.dumps(sample['before'], ensure_ascii=False)}")
            _say(f"    after:  {json.dumps(sample['after'], ensure_ascii=False)}")
        self._write_outputs(after, seconds)

    def _run_line(self) -> str:
        config, data = self._config(), self.datamodule
        source = Path(data.path).name if data.path else "BBC News"
        base = f" (base quantized: {config.quantize})" if config.quantize else ""
        return (
            f"{Path(config.model.model_path).name}{base}, task {config.task}: {data.train_size} "
            f"training / {data.val_size} held-out rows of {source}; "
            f"{describe(config.method, self.peft_config)}"
        )

    @rank_zero_only
    def _write_outputs(self, after: dict[str, float], seconds: float) -> None:
        adapter = self.output_dir / "adapter"
        written = any(
            (adapter_directory(adapter, name) / CONFIG_NAME).is_file()
            for name in self.adapters or [DEFAULT_NAME]
        )
        if written and getattr(self.model, "head", None) is not None:
            from safetensors.torch import save_file

            head = {
                k: v.detach().cpu().contiguous() for k, v in self.model.head.state_dict().items()
            }
            save_file(head, adapter / "task_head.safetensors")
        plot = self.curves.plot(self.output_dir / "curves.png")
        report, config = self.peft_callback.report, self._config()
        summary = {
            "task": config.task,
            "model": str(config.model.model_path),
            "method": config.method,
            "quantize": config.quantize,
            "lr": self.model.lr,
            "before": self.before,
            "after": after,
            "samples": [
                {k: s[k] for k in ("label", "before", "after")}
                | {"headline": s["text"].strip().splitlines()[0]}
                for s in self.samples
            ],
            "train_size": self.datamodule.train_size,
            "val_size": self.datamodule.val_size,
            "seconds": round(seconds, 1),
            "trainable_params": report.trainable_params if report else None,
            "total_params": report.total_params if report else None,
            "threads": torch.get_num_threads(),
        }
        _write_text(self.output_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        if not written:  # the callback writes it when training ends; no step, no end
            _say(
                f"no adapter written: no step was trained (the run stood at step "
                f"{self.trainer.global_step}, its max_epochs/max_steps were reached); raise "
                "--trainer.max_epochs or --trainer.max_steps to continue"
            )
        _say(
            f"adapter: {adapter if written else '-'}  curves: {plot}  summary: "
            f"{self.output_dir / 'summary.json'}  ({seconds:.0f} s)"
        )


def _format(metrics: dict[str, float]) -> str:
    parts = []
    if "val_acc" in metrics:
        parts.append(f"accuracy {100 * metrics['val_acc']:.1f}%")
    if "val_loss" in metrics:
        parts.append(f"loss {metrics['val_loss']:.4f}")
    return ", ".join(parts) or "(no metrics)"


@rank_zero_only
def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@rank_zero_only
def _say(message: str) -> None:
    print(f"lightning-peft: {message}", flush=True)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-peft`` command."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # Lightning 2.6 on torch 2.13 warns about its own use of torch's pytree on every run.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    argv = sys.argv[1:] if args is None else list(args)
    try:
        if argv[:1] == ["inspect"]:
            inspect_main(argv[1:])
            return
        argv = expand_shortcuts(argv)
        if args is None:  # LightningCLI warns when both sys.argv and args carry arguments
            sys.argv[1:], argv = argv, None
        PEFTCLI(
            FineTuneTask,
            TextData,
            args=argv,
            parser_class=OneLineErrorParser,
            parser_kwargs={"description": DESCRIPTION},
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                "max_epochs": None,  # per task: DEFAULT_EPOCHS
                "accelerator": "auto",
                "devices": 1,
                "num_sanity_val_steps": 0,  # the command validates before training anyway
                "logger": {
                    "class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": DEFAULT_OUTPUT_DIR},  # becomes --output_dir
                },
                "log_every_n_steps": 5,
            },
        )
    except InputError as error:
        print(f"lightning-peft: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except DivergenceError as error:  # the run started and failed: 1, not a usage error's 2
        print(f"lightning-peft: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
