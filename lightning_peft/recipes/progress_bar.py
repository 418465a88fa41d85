"""A progress bar that counts optimizer steps in a run bounded by ``max_steps``.

PEFT runs are usually bounded by ``max_steps`` and end mid-epoch. Lightning then sets ``max_epochs=-1``
and its bars describe the run by epochs: Rich shows ``Epoch 0/-2``, TQDM ``Epoch 0`` with a total that
is the epoch's batches. Both say nothing about how far the run is. This bar keeps Lightning's choice of
backend (Rich where it is installed, as Lightning 2.6 does, else TQDM) and its layout, and for ``max_steps`` runs describes the
training bar as ``Step 7/20`` (optimizer steps done / ``max_steps``), updated after every batch. Runs
bounded by epochs keep Lightning's description.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar


def rich_available() -> bool:
    """Whether ``rich`` can be imported (Lightning's own flag for it moved between releases)."""
    return importlib.util.find_spec("rich") is not None


def bounded_by_steps(trainer: pl.Trainer) -> bool:
    return trainer.max_epochs == -1 and trainer.max_steps is not None and trainer.max_steps > 0


def step_description(trainer: pl.Trainer) -> str:
    return f"Step {trainer.global_step}/{trainer.max_steps}"


class RichStepProgressBar(RichProgressBar):
    """Lightning's Rich bar; ``Step N/max_steps`` instead of ``Epoch 0/-2`` in ``max_steps`` runs."""

    def _get_train_description(self, current_epoch: int) -> str:
        if bounded_by_steps(self.trainer):
            return step_description(self.trainer)
        return super()._get_train_description(current_epoch)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if bounded_by_steps(trainer) and self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, description=step_description(trainer))


class TQDMStepProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar; ``Step N/max_steps`` instead of ``Epoch 0`` in ``max_steps`` runs."""

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        if bounded_by_steps(trainer):
            self.train_progress_bar.set_description(step_description(trainer))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if bounded_by_steps(trainer):
            self.train_progress_bar.set_description(step_description(trainer), refresh=False)


def step_progress_bar() -> ProgressBar:
    """The bar Lightning would pick by default (Rich if installed, else TQDM), counting steps."""
    return RichStepProgressBar() if rich_available() else TQDMStepProgressBar()
