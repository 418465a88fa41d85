"""Refuse, at ``setup``, the Trainer strategies and model states that PEFT cannot train correctly.

Each check here is a failure that would otherwise surface late (mid-step, at the first checkpoint) or not
at all (ranks silently training different adapters):

- a strategy we have not built for: the package knows how each of Lightning's single-device, DDP, FSDP,
  FSDP2 (``ModelParallelStrategy``) and DeepSpeed strategies treats frozen parameters and checkpoints;
  another one (a custom subclass of ``Strategy``, XLA) gets an error rather than a guess;
- a model that is already sharded when the adapters are injected: FSDP has flattened or distributed
  the base's parameters, so new adapter parameters would sit outside the sharding, unsynchronised;
- DDP with ``find_unused_parameters=True`` and reentrant gradient checkpointing, which fails in backward
  with "Expected to mark a variable ready only once".
"""

from __future__ import annotations

from typing import Any

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
