"""Refuse, at ``setup``, the Trainer strategies and model states that PEFT cannot train correctly.

Each check here is a failure that would otherwise surface late (mid-step, at the first checkpoint) or not
at all (ranks silently training different adapters):

- a strategy we have not built for: the package knows how each of Lightning's single-device, DDP, FSDP,
  FSDP2 (``ModelParallelStrategy``) and DeepSpeed strategies treats frozen parameters and checkpoints;
  another one (a custom subclass of ``Strategy``, XLA) gets an error rather than a guess;
- a model that is already sharded when the adapters are injected: FSDP has flattened or distributed
  the base's parameters, so new adapter parameters would sit outside the sharding, unsynchronised;
- DDP with ``find_unused_parameters=True`` and reentrant gradient checkpointing, which fails in backward
  with "Expected to mark a variable ready only once";
- (a warning) ``ModelCheckpoint(save_last=True)`` with sharded checkpoints: Lightning rewrites the ``last.ckpt``
  directory in place, so a kill while it is written leaves the previous step's ``meta.pt`` beside the new
  step's shards, a checkpoint that loads and resumes the wrong state. ``save_last="link"`` points
  ``last.ckpt`` at the newest complete checkpoint instead.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_peft.core.sharding import is_sharded
from lightning_peft.quantization.prepare import uses_reentrant_checkpointing


def _supported_strategies() -> tuple[type, ...]:
    from lightning.pytorch.strategies import (
        DDPStrategy,
        DeepSpeedStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
        SingleDeviceStrategy,
    )

    return (SingleDeviceStrategy, DDPStrategy, FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy)


SUPPORTED_DESCRIPTION = "'auto'/single device, 'ddp' (and ddp_spawn/ddp_notebook), 'fsdp', ModelParallelStrategy (FSDP2) or 'deepspeed'"


def check_strategy(trainer: Any, model: nn.Module | None) -> None:
    """Raise ``ValueError`` for an unsupported strategy or a combination known to fail (see module docstring)."""
    from lightning.pytorch.strategies import DDPStrategy

    strategy = trainer.strategy
    if not isinstance(strategy, _supported_strategies()):
        raise ValueError(
            f"lightning_peft does not support the {type(strategy).__name__} strategy; use {SUPPORTED_DESCRIPTION}"
        )
    warn_in_place_last_checkpoint(trainer)
    if model is None:
        return
    if is_sharded(model):
        raise RuntimeError(
            f"{type(model).__name__} is already sharded (FSDP) before the adapters were injected; adapters added now "
            f"would not be sharded or synchronised. Inject first: build the model in PEFTMixin.configure_base_model and "
            f"shard it in PEFTMixin.parallelize, which runs after injection"
        )
    if isinstance(strategy, DDPStrategy) and uses_reentrant_checkpointing(model):
        if getattr(strategy, "_ddp_kwargs", {}).get("find_unused_parameters"):
            raise ValueError(
                "reentrant gradient checkpointing with DDP(find_unused_parameters=True) fails with 'Expected to mark a "
                "variable ready only once'. PEFT needs no find_unused_parameters (DDP only tracks trainable parameters): "
                "use strategy='ddp', or model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})"
            )


def check_merged_export(trainer: Any, export_merged: bool) -> None:
    """A merged export needs every base weight whole on the writing rank; sharded strategies hold slices.

    Gathering the whole base to rank 0 at every export would cost what sharding saves (and FSDP1's full state
    dict is a collective the other ranks would not join from inside rank 0's export), so it is refused at
    ``setup``, with the way that works: export the adapter, then merge in one process.
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    strategy = trainer.strategy
    zero3 = isinstance(strategy, DeepSpeedStrategy) and isinstance(strategy.config, dict) and strategy.zero_stage_3
    if export_merged and (isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)) or zero3):
        raise ValueError(
            f"export_merged=True under {type(strategy).__name__}{' (ZeRO-3)' if zero3 else ''}: the base weights are "
            f"sharded across ranks. Export the adapter (export_merged=False) and merge it afterwards in one process: "
            f"load_adapter(base, 'adapter_dir') then lightning_peft.export.merged.save_merged(model, 'merged_dir')"
        )


def writes_sharded_checkpoints(strategy: Any) -> bool:
    """Whether ``strategy`` saves a checkpoint as a directory of per-rank shards (FSDP2's default; FSDP1 with
    ``state_dict_type="sharded"``)."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    if isinstance(strategy, ModelParallelStrategy):
        return bool(getattr(strategy, "_save_distributed_checkpoint", True))
    if isinstance(strategy, FSDPStrategy):
        return getattr(strategy, "_state_dict_type", "full") == "sharded"
    return False


def warn_in_place_last_checkpoint(trainer: Any) -> None:
    """Warn when a sharded ``last.ckpt`` would be rewritten in place (see the module docstring)."""
    if not writes_sharded_checkpoints(trainer.strategy):
        return
    for saver in getattr(trainer, "checkpoint_callbacks", []):
        if getattr(saver, "save_last", None) is True:
            rank_zero_warn(
                f"ModelCheckpoint(save_last=True) under {type(trainer.strategy).__name__}: sharded checkpoints are "
                f"directories and Lightning rewrites last.ckpt in place, so a run killed while writing it leaves a "
                f"last.ckpt that mixes two steps. Use ModelCheckpoint(save_last='link'), which points last.ckpt at the "
                f"newest complete checkpoint"
            )
