"""What FSDP does to a model that the rest of the package must see through.

FSDP1 (``FullyShardedDataParallel``) inserts wrapper modules, so parameter names gain
``_fsdp_wrapped_module.`` segments that its state-dict hooks take out again, and with
``use_orig_params=True`` each parameter becomes a view of this rank's shard of a flat tensor (a 1-D slice,
often empty). FSDP2 (``fully_shard``) keeps names and turns parameters into DTensors, whose local shard is
all a rank holds; DeepSpeed ZeRO-3 leaves each parameter's ``data`` empty outside a gather. Anything that reads the frozen base (the fingerprint) must therefore be computed before
sharding, and anything that matches names against a state dict must use the state-dict spelling.
"""

from __future__ import annotations

from torch import nn

#: Module-name parts that wrappers insert but take out of their state-dict keys again (FSDP1 units,
#: activation-checkpoint wrappers): ``layers.0._fsdp_wrapped_module.q_proj`` saves as ``layers.0.q_proj``.
_WRAPPER_PARTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def state_dict_name(name: str) -> str:
    """The state-dict spelling of a parameter, buffer or module name from ``named_parameters()`` /
    ``named_modules()`` (a wrapped module's own name ends in a wrapper part: ``q_proj._fsdp_wrapped_module``)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP (FSDP1's wrapper or FSDP2's ``fully_shard``) has been applied inside ``model``, or DeepSpeed
    ZeRO-3 has partitioned its parameters (each then carries a ``ds_id`` and an empty ``data``)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6 exposes FSDP2 elsewhere; FSDP1 is still detected
        FSDPModule = ()  # noqa: N806
    if any(isinstance(module, (FullyShardedDataParallel, FSDPModule)) for module in model.modules()):
        return True
    return any(hasattr(param, "ds_id") for param in model.parameters())
