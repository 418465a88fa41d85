"""``PEFTCallback``: parameter-efficient fine-tuning for the Trainer you already have.

Order matters (Lightning 2.6): ``Callback.setup`` runs after the LightningModule is built and before
``configure_model``, checkpoint restore, the strategy's wrapping (DDP/FSDP) and ``configure_optimizers``.
So at ``setup`` we inject the adapters and freeze the base; everything after sees the adapted model.
When the module builds its model in ``configure_model`` (:class:`~lightning_peft.PEFTMixin`), the model
does not exist yet at ``setup``: the callback hands the method to the mixin, which injects right after
building and before the user's sharding.

With ``quantization=Quantization(...)`` the base is quantized in place first (QLoRA: the frozen
linear layers become bitsandbytes 4-bit or 8-bit layers, the adapters wrap them and stay float32).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_peft.core.model_lookup import find_model
from lightning_peft.formats.adapter_dir import WEIGHTS_NAME
from lightning_peft.formats.atomic import check_export_target, recover_interrupted_write
from lightning_peft.formats.from_source import check_merged_export_possible
from lightning_peft.formats.merged import save_merged
from lightning_peft.formats.peft_format import save_adapter
from lightning_peft.integration.data_driven_init import initialise_from_trainer, needs_data_init
from lightning_peft.integration.distributed import full_adapter_parameters
from lightning_peft.integration.mixin import PEFTMixin
from lightning_peft.integration.pipeline import prepare_for_training
from lightning_peft.integration.strategies import (
    allow_per_step_graphs,
    check_merged_export,
    check_strategy,
    check_trainer_compatibility,
    configure_fsdp1,
    run_unwrapped_when_nothing_trains,
)
from lightning_peft.methods.base import PEFTMethod
from lightning_peft.methods.composition import as_method
from lightning_peft.operations.merging import check_mergeable
from lightning_peft.quantization.config import Quantization

ExportWhen = Literal["fit_end", "checkpoint", "both"]


class PEFTCallback(Callback):
    """Inject a PEFT method at ``setup``, keep checkpoints adapter-only, and export adapters.

    Args:
        method: the PEFT method, e.g. ``LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"])``.
        model_attr: attribute of the LightningModule that holds the model to adapt. By default the single
            transformers model inside the module is used, or the module itself.
        export_dir: where to write the adapter (HF peft format) in ``<export_dir>/adapter``; nothing is
            exported when ``None``.
        export_on: ``"fit_end"``, ``"checkpoint"`` (``<export_dir>/step-<N>/``) or ``"both"``.
        export_merged: also write the merged model in transformers ``save_pretrained`` format
            (``<export_dir>/merged``), made from the base weights plus the adapters' deltas. With a
            quantized base, from the original weights re-read from the checkpoint, in 16 bits.
        quantization: quantize the base model in place at ``setup``, before injection (QLoRA), e.g.
            ``Quantization(bits=4, quant_type="nf4", double_quant=True, compute_dtype="bfloat16")``. Every
            ``nn.Linear`` except the output head and ``skip_modules`` is converted; norms go to float32.
        export_untrained: export at ``fit_end`` even when this ``fit`` made no optimizer step (an empty
            data set, a resume past ``max_steps``). Off by default: such a run would write its untrained
            (or unchanged) adapter over the trained export of an earlier run; it is skipped with a warning.

    Exports write only their own files into ``export_dir`` (other files there are kept) and replace an earlier
    export so that the old or the new one is loadable at every instant (see ``formats/atomic.py``). An adapter
    with NaN or inf values is never exported: the run diverged, and ``fit`` ends with an error saying so.
    With ``export_on="checkpoint"``, ``step-N/`` exports follow the checkpoint callback's retention: an export
    is removed when the checkpoint of its step is (``save_top_k``).

    Example::

        trainer = L.Trainer(callbacks=[PEFTCallback(LoRA(r=8, target_modules=["q_proj", "v_proj"]))])
        qlora = PEFTCallback(LoRA(r=16, target_modules="all-linear"), quantization=Quantization(bits=4))
    """

    def __init__(
        self,
        method: Union[PEFTMethod, list[PEFTMethod]],
        model_attr: str | None = None,
        export_dir: str | None = None,
        export_on: ExportWhen = "fit_end",
        export_merged: bool = False,
        quantization: Optional[Quantization] = None,
        export_untrained: bool = False,
    ) -> None:
        method = as_method(method)  # a list of methods is a Composition
        if export_on not in ("fit_end", "checkpoint", "both"):
            raise ValueError(f"export_on={export_on!r}; choose 'fit_end', 'checkpoint' or 'both'")
        if quantization is not None and not isinstance(quantization, Quantization):
            raise TypeError(f"quantization must be a lightning_peft.Quantization(...), got {type(quantization).__name__}")
        self.method = method
        self.model_attr = model_attr
        self.export_dir = export_dir
        self.export_on = export_on
        self.export_merged = export_merged
        self.quantization = quantization
        self.export_untrained = export_untrained
        self._steps_at_fit_start: int | None = None
        self._restored_step: int | None = None  # the global step of the checkpoint this fit resumed from
        self._exported_steps: set[int] = set()
        self._adapted_model: tuple[pl.LightningModule, Any] | None = None
        self._step_seen: int | None = None  # the global step at the last on_train_batch_end

    # -- injection --------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restored_step = None
        self._adapted_model = None  # found again for each stage: the model is built (configure_model) after setup
        if self.export_dir and self.export_on in ("checkpoint", "both"):
            # Lightning skips Callback.on_save_checkpoint for weights-only saves: those steps would
            # silently get no export.
            weights_only = [cb for cb in trainer.checkpoint_callbacks if getattr(cb, "save_weights_only", False)]
            if weights_only:
                raise ValueError(
                    f"export_on={self.export_on!r} exports when a checkpoint is saved, but Lightning does not call "
                    f"callbacks for weights-only checkpoints ({type(weights_only[0]).__name__}(save_weights_only=True)). "
                    f"Use save_weights_only=False (adapter-only checkpoints are small anyway) or export_on='fit_end'"
                )
        check_merged_export(trainer, self.export_merged)
        if self.export_dir and self.method.exported() is None and not self.export_merged:
            raise ValueError(
                f"export_dir={self.export_dir!r}, but {self.method!r} trains no adapter tensors to export (the whole model "
                f"trains): pass export_merged=True to export the fine-tuned model in transformers format"
            )
        if self.export_dir:  # a path that cannot be written fails now, not at fit_end after hours of training
            for name in ("adapter", "merged") if self.export_merged else ("adapter",):
                check_export_target(Path(self.export_dir) / name)
        # FSDP1 wraps after setup: give it units that keep adapters apart from the frozen base.
        configure_fsdp1(trainer.strategy)
        run_unwrapped_when_nothing_trains(trainer, self.method)
        if isinstance(pl_module, PEFTMixin):
            check_strategy(trainer, pl_module.peft_model)
            allow_per_step_graphs(trainer, pl_module.peft_model, self.method)  # the model may not be built yet (configure_model)
            if self.quantization is not None:
                check_trainer_compatibility(trainer, self.quantization, pl_module.peft_model)
                pl_module.use_quantization(self.quantization, trainer.strategy.root_device)
            pl_module.use_peft_method(self.method)  # injects now, or in configure_model once built
            return
        model = find_model(pl_module, self.model_attr)
        if model is None:
            raise ValueError(
                f"PEFTCallback found no model in {type(pl_module).__name__} at setup; build it in __init__, "
                f"or build it in configure_model and inherit lightning_peft.PEFTMixin"
            )
        check_strategy(trainer, model)
        allow_per_step_graphs(trainer, model, self.method)
        if self.quantization is not None:
            check_trainer_compatibility(trainer, self.quantization, model)
        prepare_for_training(pl_module, model, self.method, self.quantization, trainer.strategy.root_device, model_attr=self.model_attr)
        if self.export_merged:  # a prompt method, a bottleneck adapter, a k-bit base without its source: refuse now
            check_merged_export_possible(model)
            check_mergeable(model)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning restores the loops' counters after on_fit_start: a resumed run still reads 0 here, and its
        # checkpoint's step arrives in on_load_checkpoint.
        self._steps_at_fit_start = trainer.global_step
        check_optimizers_cover_trainable(trainer, pl_module)
        if needs_data_init(self.method) and trainer.ckpt_path is None:
            # LoRA-GA: from the Trainer's own batches, now that the model is on its device. A resumed run
            # (ckpt_path) already has its trained adapters and initial factors back from the checkpoint.
            initialise_from_trainer(trainer, pl_module, self._model(pl_module), self.method)
        if not self.method.trains_parameters:
            # Inference-time intervention is fitted from data just now; it has no tensor an optimizer could step.
            # The fit ends here (no training batch runs) and its fit-end export is the result.
            trainer.should_stop = True
            rank_zero_info(f"lightning_peft: {type(self.method).__name__} trains no tensors; fit ends after fitting it from data")
        if self.export_merged and isinstance(pl_module, PEFTMixin) and pl_module.peft_model is not None:
            check_merged_export_possible(pl_module.peft_model)  # the model exists now; fail before training
            check_mergeable(pl_module.peft_model)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._step_seen = trainer.global_step  # restored by now on a resume: the next step is the first new one

    # -- checkpoints ------------------------------------------------------------------------------
    # Checkpoint metadata and verification are not done here: Callback hooks miss weights-only saves and
    # run after the weights are loaded. PEFTMixin does both in its module hooks, and setup() installs the
    # same on other modules (checkpointing.attach_checkpoint_hooks).
    def _model(self, pl_module: pl.LightningModule) -> Any:
        # Looked up once per stage, not on every batch: find_model walks every submodule, and the per-batch hooks
        # (LayerDrop's draw, InCA's metrics) ask for the model each time. The first call comes after the strategy's
        # setup and configure_model, so the object found is the one the stage trains.
        if self._adapted_model is None or self._adapted_model[0] is not pl_module:
            attribute = self.model_attr or getattr(pl_module, "peft_model_attr", None)
            self._adapted_model = (pl_module, find_model(pl_module, attribute))
        return self._adapted_model[1]

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.export_dir and self.export_on in ("checkpoint", "both"):
            step = trainer.global_step
            # ModelCheckpoint saves twice at one step with save_last=True (the top-k file, then last.ckpt):
            # the adapter is the same, so it is exported once.
            if step not in self._exported_steps:
                self._export(trainer, pl_module, Path(self.export_dir) / f"{STEP_EXPORT_PREFIX}{step}")
                self._exported_steps.add(step)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.method.before_training_batch(self._model(pl_module), trainer.global_step, batch_idx)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        metrics = self.method.training_metrics(self._model(pl_module))  # InCA: each adapter's own loss
        if metrics:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        if trainer.global_step != self._step_seen:  # an optimizer step happened (not every batch under accumulation)
            self._step_seen = trainer.global_step
            self.method.after_optimizer_step(
                self._model(pl_module), trainer.global_step, lambda tensor: trainer.strategy.reduce(tensor, reduce_op="mean")
            )
        self._prune_step_exports(trainer)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # Counts each rank kept over its shard, summed here: every rank logs (and acts on) the same values.
        metrics = self.method.validation_metrics(self._model(pl_module), lambda tensor: trainer.strategy.reduce(tensor, reduce_op="sum"))
        if metrics:
            pl_module.log_dict(metrics)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._prune_step_exports(trainer)  # ModelCheckpoint removes files after saving, here or at batch end

    def _prune_step_exports(self, trainer: pl.Trainer) -> None:
        if not (self.export_dir and self.export_on in ("checkpoint", "both") and trainer.is_global_zero and self._exported_steps):
            return
        kept = retained_checkpoint_steps(trainer)
        if kept is None:
            return
        for step in sorted(self._exported_steps - kept):
            shutil.rmtree(Path(self.export_dir) / f"{STEP_EXPORT_PREFIX}{step}", ignore_errors=True)
            self._exported_steps.discard(step)

    # -- export -----------------------------------------------------------------------------------
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._prune_step_exports(trainer)  # the last checkpoint's save may have removed an older one
        if not (self.export_dir and self.export_on in ("fit_end", "both")):
            return
        start = self._restored_step if self._restored_step is not None else self._steps_at_fit_start
        # A method that trains nothing (fitted from data at fit start, or restored from a checkpoint) never steps.
        made_no_step = start is not None and trainer.global_step == start and self.method.trains_parameters
        if made_no_step and not self.export_untrained and not self._restored_result_never_exported(trainer):
            rank_zero_warn(
                f"lightning_peft: not exporting to {Path(self.export_dir) / 'adapter'}: this fit made no optimizer step "
                f"(global_step stayed {trainer.global_step}: empty training data, or a resume at max_steps), so the "
                f"adapter is not a result of it and could overwrite a trained export. Pass "
                f"PEFTCallback(export_untrained=True) to export it anyway"
            )
            return
        self._export(trainer, pl_module, Path(self.export_dir))

    def _restored_result_never_exported(self, trainer: pl.Trainer) -> bool:
        """A resume that trained nothing more still holds a trained adapter (restored from a step > 0); when no
        export is on disk (a run killed after its last checkpoint, before or while writing its fit-end export),
        exporting it loses nothing and gives the user the result."""
        if trainer.ckpt_path is None or trainer.global_step == 0:
            return False
        missing = False
        if trainer.is_global_zero:  # the writing rank decides; every rank must then join the export's gather
            target = Path(self.export_dir) / "adapter"
            recover_interrupted_write(target)  # an export killed after its commit mark is whole once rolled forward
            missing = not (target / WEIGHTS_NAME).exists()
        return bool(trainer.strategy.broadcast(missing, src=0))

    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule, directory: os.PathLike) -> None:
        model = self._model(pl_module)
        # Every rank gathers (ZeRO-3, FSDP: each holds a slice of each adapter tensor); rank 0 writes. A NaN or inf
        # adapter is refused by the writer (the run diverged): the error ends fit, the earlier export stays.
        with full_adapter_parameters(model):
            if trainer.is_global_zero:
                if self.method.exported() is not None:  # LayerDrop alone: a full fine-tune, exported merged only
                    save_adapter(model, Path(directory) / "adapter")
                if self.export_merged:
                    save_merged(model, Path(directory) / "merged", tokenizer=getattr(pl_module, "tokenizer", None))
        rank_zero_info(f"lightning_peft: exported to {directory}")

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._restored_step = int(checkpoint.get("global_step", 0))

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.method.to_dict(), "exported_steps": sorted(self._exported_steps)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A resumed run keeps pruning the step exports of the run it continues.
        self._exported_steps = set(state_dict.get("exported_steps", ()))


STEP_EXPORT_PREFIX = "step-"


def retained_checkpoint_steps(trainer: pl.Trainer) -> set[int] | None:
    """Global steps whose checkpoints the checkpoint callbacks still keep (their top-k files and last), read
    from the ``step=N`` in the file names (Lightning's default); None when a kept name carries no step (then
    nothing is pruned: better too many exports than one whose checkpoint still exists)."""
    steps: set[int] = set()
    for callback in trainer.checkpoint_callbacks:
        paths = [*getattr(callback, "best_k_models", {}), getattr(callback, "last_model_path", ""), getattr(callback, "best_model_path", "")]
        for path in filter(None, paths):
            found = re.search(r"step=(\d+)", Path(path).name)
            if found is None:
                if Path(path).name.startswith("last"):
                    continue  # last.ckpt is the newest step, which is never pruned below
                return None
            steps.add(int(found.group(1)))
        if getattr(callback, "save_top_k", 1) == -1:
            return None  # keeps every checkpoint
    steps.add(trainer.global_step)
    return steps


def check_optimizers_cover_trainable(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Fail loudly when an adapter parameter is in no optimizer: it would silently never train.

    This is what happens when an optimizer is built from ``model.parameters()`` before injection (e.g.
    a LightningCLI ``optimizer:`` key resolved too early).
    """
    if not trainer.optimizers:
        return
    in_optimizer = {id(p) for opt in trainer.optimizers for p in _optimized_parameters(opt)}
    orphans = [n for n, p in pl_module.named_parameters() if p.requires_grad and id(p) not in in_optimizer]
    if orphans:
        raise RuntimeError(
            f"{len(orphans)} trainable adapter parameters are in no optimizer (e.g. {orphans[:3]}), so they would never "
            f"train. Build the optimizer in configure_optimizers from the trainable parameters: "
            f"torch.optim.AdamW(p for p in self.parameters() if p.requires_grad)"
        )


def _optimized_parameters(optimizer: Any) -> list[Any]:
    """The model parameters an optimizer updates. DeepSpeed's ZeRO optimizers keep flat float32 partitions in
    ``param_groups``; the model's own parameters are in their ``bit16_groups`` (stages 1-2), ``fp16_groups``
    (stage 3) or ``bf16_groups`` (``BF16_Optimizer``)."""
    for attribute in ("bit16_groups", "fp16_groups", "bf16_groups"):  # BF16_Optimizer: ZeRO-1 with bf16
        groups = getattr(optimizer, attribute, None)
        if groups:
            return [p for group in groups for p in group]
    return [p for group in optimizer.param_groups for p in group["params"]]
