"""Small torch.distributed helpers: strategy names and parameter names without wrapper segments."""

from __future__ import annotations

SHARDED_STRATEGIES = ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy")


# Segments that FSDP1 and activation-checkpoint wrappers add to ``named_parameters()`` names but
# that their state dicts (and Lightning's checkpoints) leave out.
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def strategy_is(strategy, *names: str) -> bool:
    """Whether ``strategy`` is (a subclass of) one of the strategy classes ``names``."""
    return any(base.__name__ in names for base in type(strategy).__mro__)


def is_sharded_strategy(strategy) -> bool:
    """FSDP (``FSDPStrategy``), FSDP2 (``ModelParallelStrategy``) or DeepSpeed."""
    return strategy_is(strategy, *SHARDED_STRATEGIES)


def clean_name(name: str) -> str:
    """``name`` (from ``named_parameters()``) as state dicts key it: FSDP1 and activation
    checkpointing wrap submodules, which adds ``_fsdp_wrapped_module.`` segments to names."""
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name
