"""FSDP2: sharding a model with adapters, and gathering a full state dict."""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl
from torch import Tensor, nn

from lightning_peft.core.distributed import is_sharded_strategy, strategy_is


def fsdp2_shard(
    model: nn.Module, layer_cls: type | tuple[type, ...], mesh=None, **kwargs
) -> nn.Module:
    """Shard an adapted ``model`` with FSDP2: ``fully_shard`` each ``layer_cls`` block, then
    the root. Inject adapters first: each block's frozen weights and its trainable adapters
    are then sharded together (FSDP2 shards per parameter, so mixed ``requires_grad`` is fine).

    Args:
        model: the adapted model.
        layer_cls: the block class(es), e.g. ``LlamaDecoderLayer``.
        mesh: the data-parallel ``DeviceMesh`` (default: all ranks).
        kwargs: passed to ``fully_shard`` (e.g. ``mp_policy``).
    """
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard

    for module in model.modules():
        if isinstance(module, layer_cls):
            fully_shard(module, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return model


def full_state_dict(strategy, pl_module: nn.Module) -> Mapping[str, Tensor]:
    """Full (unsharded) tensors of ``pl_module`` keyed as its ``state_dict()``.

    A collective under FSDP/FSDP2 (every rank must call it); the local tensors elsewhere.
    """
    if strategy_is(strategy, "ModelParallelStrategy"):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=False)
        return get_model_state_dict(pl_module, options=options)
    if is_sharded_strategy(strategy):
        return strategy.lightning_module_state_dict()
    return pl_module.state_dict()


def is_transformers_model(module: nn.Module) -> bool:
    return hasattr(module, "config") and callable(getattr(module, "get_input_embeddings", None))


def data_parallel_mesh(pl_module: pl.LightningModule):
    mesh = getattr(pl_module, "device_mesh", None)
    if mesh is not None and mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names:
        return mesh["data_parallel"]
    return mesh


def full_checkpoint(strategy) -> bool:
    """Whether a sharded strategy writes a full (gathered) checkpoint rather than shards."""
    if hasattr(strategy, "_save_distributed_checkpoint"):
        return not strategy._save_distributed_checkpoint
    return getattr(strategy, "_state_dict_type", "full") == "full"
