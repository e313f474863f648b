"""One "node" of a two-node DDP run on one machine (gloo, loopback), for ``test_multinode.py``.

``NODE_RANK=r MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/multinode_script.py OUT PHASE``:
the ``Trainer`` gets ``num_nodes=2, devices=1, strategy="ddp"``, so Lightning's own launcher
(``LightningEnvironment`` + ``_SubprocessScriptLauncher``) computes this process's global rank
from ``NODE_RANK`` and joins the other node at ``MASTER_ADDR:MASTER_PORT``; nothing here sets a
rank. The two nodes read different shards of the data (``DistributedSampler``).

- ``PHASE=train``: ``TRAIN_STEPS`` steps with LoRA on a tiny Llama, a checkpoint
  (``OUT/ckpt/last.ckpt``) and the PEFT adapter directory (``OUT/adapter_train``, rank 0);
- ``PHASE=resume``: resumes from that checkpoint to ``RESUME_STEPS`` (``OUT/adapter_resume``).

Each rank writes ``OUT/{PHASE}_rank{r}.pt``: its rank and world size, the adapters at
``on_train_start`` and at the end, the steps, and the eval logits of the trained model on
``IDS`` (to compare with the exported adapter loaded in peft).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests.helpers, run as a script

from lightning_peft import LoRAConfig, PEFTCallback, adapter_state_dict
from tests.helpers.lightning_modules import CausalLM, random_tokens

CONFIG = LoRAConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1)
TRAIN_STEPS, RESUME_STEPS = 3, 5
IDS = random_tokens(4, seed=7)


class ShardedCausalLM(CausalLM):
    """``CausalLM`` whose loader Lightning shards across the nodes (no fixed generator)."""

    def train_dataloader(self):
        return DataLoader(random_tokens(64), batch_size=4, shuffle=True)


class Record(Callback):
    def __init__(self) -> None:
        self.record: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.record |= {
            "start_step": trainer.global_step,
            "start": {k: v.clone() for k, v in adapter_state_dict(pl_module).items()},
        }

    def on_train_end(self, trainer, pl_module) -> None:
        pl_module.eval()
        with torch.no_grad():
            logits = pl_module.model(input_ids=IDS).logits
        self.record |= {
            "global_rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "node_rank": trainer.node_rank,
            "end_step": trainer.global_step,
            "end": {k: v.clone() for k, v in adapter_state_dict(pl_module).items()},
            "logits": logits,
        }


def main(out: Path, phase: str) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0)
    record = Record()
    trainer = pl.Trainer(
        accelerator="cpu",
        num_nodes=2,
        devices=1,
        strategy=DDPStrategy(process_group_backend="gloo"),
        max_steps=TRAIN_STEPS if phase == "train" else RESUME_STEPS,
        callbacks=[
            PEFTCallback(CONFIG, save_adapter_to=out / f"adapter_{phase}", verbose=False),
            ModelCheckpoint(dirpath=out / "ckpt", save_last=True, save_top_k=0),
            record,
        ],
        default_root_dir=out,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    ckpt_path = out / "ckpt" / "last.ckpt" if phase == "resume" else None
    trainer.fit(ShardedCausalLM(), ckpt_path=ckpt_path)
    torch.save(record.record, out / f"{phase}_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
