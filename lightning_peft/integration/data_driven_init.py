"""Adapter initialisations that need training data, run from the Trainer's own data.

Some methods set their adapters from a few training batches: LoRA-GA's gradient SVD
(:meth:`LoRA.initialise_from_data <lightning_peft.methods.lora.LoRA.initialise_from_data>`), sparse fine-tuning's
choice of entries (:class:`~lightning_peft.methods.sparse_ft.SparseFT`). A method says so with
:attr:`~lightning_peft.methods.base.PEFTMethod.needs_data` and does the work in
:meth:`~lightning_peft.methods.base.PEFTMethod.initialise_from_data`; this module gives it the Trainer's batches,
a loss and a cross-rank mean, and knows nothing about what it computes.

:class:`~lightning_peft.PEFTCallback` calls :func:`initialise_from_trainer` when fitting starts
(``on_fit_start``): the model is then on its device and wrapped by the strategy, the optimizers hold
the adapter tensors (which are updated in place, their optimizer state still empty), and a resumed run
has already restored its adapters, in which case nothing is estimated again. The batches come from the
Trainer's train dataloader, with its distributed sampler, so each rank estimates on its own shard and
the method averages its estimates across ranks (``reduce``) before it decides anything.
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

from lightning_peft.integration.strategies import shards_parameters
from lightning_peft.methods.base import PEFTMethod


def needs_data_init(method: Any) -> bool:
    return bool(getattr(method, "needs_data", False))


def _method_name(method: Any) -> str:
    return type(method).__name__ if method is not None else "this method"


def training_batches(trainer: pl.Trainer, count: int, method: Any = None) -> list[Any]:
    """The first ``count`` batches of the Trainer's train dataloader (loading it if fit has not yet);
    ``method`` (the one that asks) is named in the errors."""
    name = _method_name(method)
    hint = "define train_dataloader() in the LightningModule or DataModule, or pass train_dataloaders to fit"
    try:
        trainer.fit_loop.setup_data()  # idempotent: the fit loop reuses what this loads
    except (TypeError, ValueError) as err:  # Lightning's own check of what train_dataloader() returned (None, ...)
        raise ValueError(
            f"{name} initialises its adapters from the training data, but this Trainer has no train dataloader it can use: {err}"
        ) from err
    loader = trainer.train_dataloader
    if loader is None:
        raise ValueError(f"{name} initialises its adapters from the training data, but this Trainer has no train dataloader ({hint})")
    if not isinstance(loader, torch.utils.data.DataLoader):
        raise ValueError(f"{name} needs one train DataLoader, got {type(loader).__name__}; combine them into one")
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


def _loss(output: Any, method: Any = None) -> torch.Tensor:
    loss = output["loss"] if isinstance(output, dict) else output
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        raise ValueError(
            f"{_method_name(method)} needs training_step to return a scalar loss (or a dict with 'loss'), got {type(output).__name__}"
        )
    return loss


def initialise_from_trainer(trainer: pl.Trainer, pl_module: pl.LightningModule, model: nn.Module, method: PEFTMethod) -> None:
    """Initialise ``method``'s adapters in ``model`` from ``method.init_batches`` of the Trainer's training batches.

    ``method.initialise_from_data`` gets the batches (``(index, batch)`` pairs), a ``loss_fn`` that runs the
    module's own ``training_step`` on one (on the strategy's device, under its precision, with logging off) and
    ``reduce``, the strategy's mean over the ranks.
    """
    name = _method_name(method)
    if shards_parameters(trainer.strategy):
        raise NotImplementedError(
            f"{name}'s data-driven initialisation with {type(trainer.strategy).__name__} (sharded parameters) is not "
            f"supported yet: it needs every rank to hold whole weights. Use DDP or one device"
        )
    batches = training_batches(trainer, method.init_batches, method)
    was_training = pl_module.training
    pl_module.train()

    def loss_fn(indexed: tuple[int, Any]) -> torch.Tensor:
        index, batch = indexed
        batch = trainer.strategy.batch_to_device(batch)
        with trainer.precision_plugin.train_step_context(), _logging_disabled(pl_module):
            return _loss(pl_module.training_step(batch, index), method)

    def mean_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
        return trainer.strategy.reduce(tensor, reduce_op="mean")

    try:
        method.initialise_from_data(model, enumerate(batches), loss_fn, mean_across_ranks)
    finally:
        pl_module.train(was_training)
    rank_zero_info(f"lightning_peft: {name} initialised its adapters from {len(batches)} training batches per rank")
