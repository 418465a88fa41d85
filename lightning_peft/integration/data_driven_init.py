"""Adapter initialisations that need training data (LoRA-GA), run from the Trainer's own data.

:class:`~lightning_peft.PEFTCallback` calls :func:`initialise_from_trainer` when fitting starts
(``on_fit_start``): the model is then on its device and wrapped by the strategy, the optimizers hold
the adapter tensors (which are updated in place, their optimizer state still empty), and a resumed run
has already restored its adapters, in which case nothing is estimated again. The batches come from the
Trainer's train dataloader, with its distributed sampler, so each rank estimates on its own shard and
the estimates are averaged across ranks before the SVD.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from lightning_peft.core.adapter_layer import adapter_layers
from lightning_peft.integration.strategies import shards_parameters
from lightning_peft.methods.lora import LoRA, LoRALayer
from lightning_peft.methods.lora_ga import estimate_weight_gradients, initialise_from_gradients


def needs_data_init(method: Any) -> bool:
    return bool(getattr(method, "needs_data", False))


def training_batches(trainer: pl.Trainer, count: int) -> list[Any]:
    """The first ``count`` batches of the Trainer's train dataloader (loading it if fit has not yet)."""
    trainer.fit_loop.setup_data()  # idempotent: the fit loop reuses what this loads
    loader = trainer.train_dataloader
    if loader is None:
        raise ValueError(
            "LoRA-GA estimates its init from the training data, but this Trainer has no train dataloader "
            "(define train_dataloader() in the LightningModule or DataModule, or pass train_dataloaders to fit)"
        )
    if not isinstance(loader, torch.utils.data.DataLoader):
        raise ValueError(f"LoRA-GA needs one train DataLoader, got {type(loader).__name__}; combine them into one")
    length = len(loader) if hasattr(loader, "__len__") else None
    if length is not None and count > length:
        raise ValueError(f"init_batches={count} is larger than the train dataloader, which has {length} batches on this rank")
    batches = list(itertools.islice(iter(loader), count))
    if len(batches) < count:
        raise ValueError(f"init_batches={count} is larger than the train dataloader, which gave {len(batches)} batches")
    return batches


@contextlib.contextmanager
def _logging_disabled(pl_module: pl.LightningModule) -> Iterator[None]:
    """``self.log`` inside training_step would fail outside the fit loop (no result collection yet)."""
    pl_module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    pl_module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        del pl_module.log, pl_module.log_dict  # back to the class's methods


def _loss(output: Any) -> torch.Tensor:
    loss = output["loss"] if isinstance(output, dict) else output
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        raise ValueError(f"LoRA-GA needs training_step to return a scalar loss (or a dict with 'loss'), got {type(output).__name__}")
    return loss


def initialise_from_trainer(trainer: pl.Trainer, pl_module: pl.LightningModule, model: nn.Module, method: LoRA) -> None:
    """Estimate LoRA-GA's gradients on ``method.init_batches`` training batches and initialise the adapters."""
    if shards_parameters(trainer.strategy):
        raise NotImplementedError(
            f"LoRA-GA with {type(trainer.strategy).__name__} (sharded parameters) is not supported yet; use DDP or one device"
        )
    layers = {name: layer for name, layer in adapter_layers(model) if isinstance(layer, LoRALayer) and layer.has_initial_factors}
    batches = training_batches(trainer, method.init_batches)
    was_training = pl_module.training
    pl_module.train()

    def loss_fn(indexed: tuple[int, Any]) -> torch.Tensor:
        index, batch = indexed
        batch = trainer.strategy.batch_to_device(batch)
        with trainer.precision_plugin.train_step_context(), _logging_disabled(pl_module):
            return _loss(pl_module.training_step(batch, index))

    try:
        gradients = estimate_weight_gradients(model, layers, enumerate(batches), loss_fn)
    finally:
        pl_module.train(was_training)

    def mean_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
        return trainer.strategy.reduce(tensor, reduce_op="mean")

    initialise_from_gradients(layers, gradients, method.r, method.lora_ga_gamma, method.svd_niter, reduce=mean_across_ranks)
    rank_zero_info(f"lightning_peft: LoRA-GA initialised {len(layers)} layers from {len(batches)} training batches per rank")
