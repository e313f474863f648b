"""Training and validation curves: a callback that records them and a PNG plot."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


class CurveRecorder(Callback):
    """Keeps ``train_loss`` per step and ``val_loss``/``val_acc`` per validation run."""

    def __init__(self) -> None:
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, dict[str, float]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = trainer.callback_metrics.get("train_loss")
        if loss is not None:
            self.train.append((trainer.global_step, float(loss)))

    def on_validation_end(self, trainer: pl.Trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
        self.val.append((trainer.global_step, metrics))

    def plot(self, path: str | Path) -> Path:
        """Loss against step (and accuracy on a second axis) as a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        if self.train:
            ax.plot(*zip(*self.train, strict=True), label="train loss", alpha=0.6)
        steps = [s for s, m in self.val if "val_loss" in m]
        if steps:
            ax.plot(
                steps,
                [m["val_loss"] for _, m in self.val if "val_loss" in m],
                "o-",
                label="validation loss",
            )
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        accuracy = [(s, m["val_acc"]) for s, m in self.val if "val_acc" in m]
        if accuracy:
            twin = ax.twinx()
            twin.plot(
                *zip(*accuracy, strict=True), "s--", color="tab:green", label="validation accuracy"
            )
            twin.set_ylabel("accuracy")
            twin.set_ylim(0, 1)
            twin.legend(loc="center right")
        ax.legend(loc="upper right")
        ax.set_title("lightning-peft fit")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path
