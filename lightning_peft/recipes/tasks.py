"""Ready-made LightningModules for Hugging Face transformers models, with or without PEFT.

* :class:`CausalLMTask` -- next-token prediction (``AutoModelForCausalLM``); logs ``train_loss``,
  ``val_loss`` and ``val_perplexity``.
* :class:`SequenceClassificationTask` -- ``AutoModelForSequenceClassification``; logs ``train_loss``,
  ``val_loss`` and ``val_accuracy``.

Both build their model in :meth:`configure_base_model`, so :class:`~lightning_peft.PEFTMixin` injects
the PEFT method right after the model exists (and before any sharding). Without a method (no
``PEFTCallback``) nothing is frozen: that is plain full fine-tuning, the reference a PEFT run is
compared with.

The optimizer is an argument (a callable taking the parameters, as jsonargparse builds it from
``{class_path: torch.optim.AdamW, init_args: {lr: 5e-4}}``), called in :meth:`configure_optimizers`
with the *trainable* parameters only. LightningCLI's automatic ``optimizer:`` key would instead build
it from ``model.parameters()`` before injection, and the adapters would never train. With
``param_groups`` (:class:`~lightning_peft.operations.param_groups.ParamGroups`: LoRA+, layer-wise learning-rate decay) the
trainable parameters are split into groups whose ``lr`` is the optimizer's own times a multiplier, set
before the scheduler is built (see :mod:`lightning_peft.operations.param_groups`).

Batches are dicts with ``input_ids``, ``attention_mask`` and ``labels`` (see :mod:`lightning_peft.recipes.data`).
Validation metrics are exact over the whole split: ``val_loss`` of the language model is the mean over
*tokens* (not a mean of per-batch means, which overweights short batches) and ``val_perplexity`` is
its exponential.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from typing import Any, Literal, Optional

import lightning.pytorch as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy

from lightning_peft.core.compilation import compile_blocks
from lightning_peft.core.injection import injected_method
from lightning_peft.core.linear_cross_entropy import IGNORE_INDEX
from lightning_peft.core.transformers_compat import enable_checkpointing
from lightning_peft.integration.mixin import PEFTMixin
from lightning_peft.integration.strategies import check_trainer_compatibility, loads_on_rank0_only, shards_parameters
from lightning_peft.methods.virtual_tokens import ATTRIBUTE as VIRTUAL_TOKENS
from lightning_peft.operations.causal_lm_loss import causal_lm_loss, check_head_is_last, lean_loss_obstacle
from lightning_peft.operations.param_groups import ParamGroups, apply_lr_scales, build_param_groups, check_scheduler_keeps_scales
from lightning_peft.quantization import load_quantized, prepare_model_for_kbit_training
from lightning_peft.quantization.config import Quantization

DType = Literal["float32", "bfloat16", "float16"]
LossKind = Literal["auto", "chunked", "plain"]


class TokenPerplexity(MeanMetric):
    """``exp`` of the token-weighted mean negative log-likelihood.

    Update with each batch's mean loss and its number of predicted tokens as ``weight``; the result is
    ``exp(sum of token NLLs / number of tokens)`` over everything seen, the standard corpus perplexity.
    (torchmetrics' ``Perplexity`` takes ``log`` of a float32 softmax, which underflows to ``inf`` for a
    token the model finds very unlikely; the model's own loss uses ``log_softmax``.)
    """

    def compute(self) -> torch.Tensor:
        return torch.exp(super().compute())


def _unpicklable(**values: Any) -> list[str]:
    """Names of ``values`` that cannot be pickled (e.g. a lambda default), to keep them out of hparams.

    Under LightningCLI the hyperparameters are the parsed config (plain data), so nothing is dropped; a
    module built in Python with the default lambda optimizer would otherwise fail at its first checkpoint.
    """
    names = []
    for name, value in values.items():
        try:
            pickle.dumps(value)
        except Exception:  # pickle raises PicklingError, AttributeError or TypeError depending on the object
            names.append(name)
    return names


class _TransformersTask(PEFTMixin, L.LightningModule):
    """What both tasks share: dtype, tokenizer, optimizer and scheduler from callables."""

    def __init__(
        self,
        model_name_or_path: str,
        dtype: DType,
        optimizer: OptimizerCallable,
        lr_scheduler: Optional[LRSchedulerCallable],
        quantization: Optional[Quantization] = None,
        param_groups: Optional[ParamGroups] = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be true or false, got {compile!r}")
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={dtype!r}; choose 'float32', 'bfloat16' or 'float16'")
        if quantization is not None and not isinstance(quantization, Quantization):
            raise TypeError(f"quantization must be a lightning_peft.Quantization(...), got {type(quantization).__name__}")
        if isinstance(param_groups, Mapping):  # e.g. {"loraplus_ratio": 16} from Python or old hparams
            param_groups = ParamGroups(**param_groups)
        if param_groups is not None and not isinstance(param_groups, ParamGroups):
            raise TypeError(f"param_groups must be a lightning_peft.ParamGroups(...), got {type(param_groups).__name__}")
        self.quantization = quantization
        self.param_groups = param_groups
        self.compile_enabled = compile
        self.model_name_or_path = model_name_or_path
        self.torch_dtype: torch.dtype = getattr(torch, dtype)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.model: Optional[nn.Module] = None  # built in configure_model (PEFTMixin)
        self._tokenizer: Any = None
        self._tokenizer_missing = False

    def _tokenizer_kwargs(self) -> dict[str, Any]:
        return {}

    def parallelize(self) -> None:
        # After injection (PEFTMixin calls this once), so the compiled blocks hold the adapter layers.
        if self.compile_enabled:
            compile_blocks(self.model)

    def _from_pretrained(self, auto_class: Any, **kwargs: Any) -> nn.Module:
        """``auto_class.from_pretrained``, or with ``quantization`` a k-bit load that streams the checkpoint
        layer by layer (never holding the 16/32-bit model in host memory), quantizing on the Trainer's device."""
        if self.quantization is None:
            return auto_class.from_pretrained(self.model_name_or_path, dtype=self.torch_dtype, **kwargs)
        trainer = self._trainer  # None outside a Trainer (e.g. load_from_checkpoint)
        if trainer is not None:
            check_trainer_compatibility(trainer, self.quantization)
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        # Under FSDP1 only rank 0 reads and quantizes; FSDP fills the other ranks' empty models when it wraps.
        rank0_only = trainer is not None and loads_on_rank0_only(trainer.strategy)
        model = load_quantized(
            self.model_name_or_path, self.quantization, auto_class, dtype=self.torch_dtype, device=device, rank0_only=rank0_only, **kwargs
        )
        return prepare_model_for_kbit_training(model)

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer, loaded on first use (the callback saves it beside a merged export).

        ``None``, with a warning, when ``model_name_or_path`` has none: a merged export at the end of a
        long run should still be written, just without a tokenizer.
        """
        if self._tokenizer is None and not self._tokenizer_missing:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.model_name_or_path, **self._tokenizer_kwargs())
            except (OSError, ValueError) as err:
                self._tokenizer_missing = True
                rank_zero_warn(f"{type(self).__name__}: no tokenizer could be loaded from {self.model_name_or_path!r} ({err})")
        return self._tokenizer

    def on_validation_epoch_start(self) -> None:
        # Fresh metric states for every validation. Lightning resets them at epoch end, and a reset inside
        # `trainer.validate` (inference mode) makes inference tensors, which the no_grad validation inside a
        # later `fit` may not update in place ("Inplace update to inference tensor outside InferenceMode").
        for module in self.modules():
            if isinstance(module, Metric):
                module.reset()

    def configure_optimizers(self) -> Any:
        # Only trainable parameters: after injection these are the adapters (and modules_to_save);
        # without a PEFT method, every parameter.
        params = [p for p in self.parameters() if p.requires_grad]
        method = injected_method(self.peft_model) if self.peft_model is not None else None
        if not params and method is not None and not method.trains_parameters:
            return None  # inference-time intervention: fitted from data, nothing to optimize (PEFTCallback ends the fit)
        if not params:
            raise RuntimeError(f"{type(self).__name__} has no trainable parameters; nothing to optimize")
        if self.param_groups is None:
            optimizer = self.optimizer_factory(params)
        else:
            # One group per lr multiplier; the optimizer gives each its own lr, which is then scaled before
            # any scheduler reads it (schedulers take their base rates from the groups when built).
            optimizer = apply_lr_scales(self.optimizer_factory(build_param_groups(self, self.param_groups)))
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        if self.param_groups is not None:
            check_scheduler_keeps_scales(scheduler)
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            # LightningCLI's ReduceLROnPlateau carries its `monitor`; plain torch's does not.
            monitor = getattr(scheduler, "monitor", "val_loss")
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": monitor, "interval": "epoch"}}
        # Fine-tuning schedules (warmup, cosine, linear decay) are written in optimizer steps.
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class CausalLMTask(_TransformersTask):
    """Causal language modelling with any ``AutoModelForCausalLM`` (a Hub id or a local directory).

    Args:
        model_name_or_path: Hub id or directory of the model (and its tokenizer).
        dtype: dtype the base weights are loaded in; adapters stay float32 whatever this is.
        optimizer: called with the trainable parameters; from YAML
            ``{class_path: torch.optim.AdamW, init_args: {lr: 5e-4}}``. Default AdamW, lr 2e-4.
        lr_scheduler: called with the optimizer, stepped every optimizer step (``ReduceLROnPlateau``:
            every epoch on ``val_loss``).
        gguf_file: file name of a GGUF checkpoint inside ``model_name_or_path`` (transformers dequantizes it).
        gradient_checkpointing: recompute activations in backward to save memory (non-reentrant, so it
            works with a frozen embedding layer).
        quantization: load the base straight into k-bit (QLoRA), streaming the safetensors checkpoint
            layer by layer, e.g. ``{bits: 4, quant_type: nf4, compute_dtype: bfloat16}`` from YAML.
        param_groups: per-group learning rates (:class:`~lightning_peft.operations.param_groups.ParamGroups`): LoRA+
            ``loraplus_ratio`` (B learns that many times faster than A) and/or layer-wise ``layer_decay``,
            e.g. ``{loraplus_ratio: 16}`` from YAML. Each group's lr is the optimizer's lr times its multiplier.
        loss: how the next-token loss is computed. ``"chunked"`` never holds the (tokens x vocab) float32 logits
            (:mod:`lightning_peft.core.linear_cross_entropy`: same gradients within float32 rounding, several
            times less memory, and prompt tokens skip the head); ``"plain"`` is transformers' own
            (``model(..., labels=...).loss``); ``"auto"`` (default) is ``"chunked"`` wherever it is exact and
            ``"plain"`` where it is not (sharded strategies, an adapted or quantized ``lm_head``, logits
            post-processed after the head, a mixture-of-experts router loss), saying why once.
        compile: ``torch.compile`` each transformer block in place after injection
            (:mod:`lightning_peft.core.compilation`); see ``benchmarks/RESULTS.md`` for where it pays.

    Example::

        model = CausalLMTask("HuggingFaceTB/SmolLM2-135M-Instruct")
        trainer = L.Trainer(max_steps=20, callbacks=[PEFTCallback(LoRA(r=8, target_modules=["q_proj", "v_proj"]))])
        trainer.fit(model, datamodule=TextFileDataModule("HuggingFaceTB/SmolLM2-135M-Instruct", "hamlet.txt"))
    """

    def __init__(
        self,
        model_name_or_path: str,
        dtype: DType = "float32",
        optimizer: OptimizerCallable = lambda p: torch.optim.AdamW(p, lr=2e-4),
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        gguf_file: Optional[str] = None,
        gradient_checkpointing: bool = False,
        quantization: Optional[Quantization] = None,
        param_groups: Optional[ParamGroups] = None,
        loss: LossKind = "auto",
        compile: bool = False,
    ) -> None:
        super().__init__(model_name_or_path, dtype, optimizer, lr_scheduler, quantization, param_groups, compile)
        if loss not in ("auto", "chunked", "plain"):
            raise ValueError(f"loss={loss!r}; choose 'auto' (chunked where exact), 'chunked' or 'plain'")
        if gguf_file and quantization is not None:
            raise ValueError(
                f"gguf_file={gguf_file!r} with quantization: the k-bit loader streams safetensors only; convert the GGUF "
                f"to a safetensors directory first (lightning-peft prepare-assets does this for SmolLM2)"
            )
        self.save_hyperparameters(ignore=_unpicklable(optimizer=optimizer, lr_scheduler=lr_scheduler))
        self.gguf_file = gguf_file
        self.gradient_checkpointing = gradient_checkpointing
        self.loss = loss
        self._chunked: Optional[bool] = None  # decided on the first batch of each fit/validate (needs model and strategy)
        self.val_loss = MeanMetric()  # token-weighted mean NLL
        self.val_perplexity = TokenPerplexity()

    def _tokenizer_kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    def configure_base_model(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        kwargs: dict[str, Any] = {}
        if self.gguf_file:
            kwargs["gguf_file"] = self.gguf_file
        model = self._from_pretrained(AutoModelForCausalLM, **kwargs)
        if self.gradient_checkpointing:
            enable_checkpointing(model, use_reentrant=False)
        # from_pretrained returns eval mode and Lightning keeps each submodule's mode: without this the
        # model's own dropout would stay off during training.
        return model.train()

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        # use_cache=False: training and scoring never reuse the key/value cache, so don't build one.
        return self.model(**_model_inputs(batch), labels=_token_labels(batch), use_cache=False)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self._chunked = None  # a new fit may run under another strategy, or after another method was injected

    def _uses_chunked_loss(self, batch: dict[str, torch.Tensor]) -> bool:
        if self._chunked is None:
            if self.loss == "plain":
                self._chunked = False
                return False
            trainer = self._trainer
            reason = "a sharded strategy holds slices of the head" if trainer is not None and shards_parameters(trainer.strategy) else None
            reason = reason or lean_loss_obstacle(self.model) or check_head_is_last(self.model, _model_inputs(batch))
            if reason is not None and self.loss == "chunked":
                raise ValueError(f"loss='chunked' cannot be exact for {self.model_name_or_path!r}: {reason}. Use loss='plain' (or 'auto')")
            if reason is not None:
                rank_zero_info(f"{type(self).__name__}: loss='auto' uses the plain loss (full logits): {reason}")
            self._chunked = reason is None
        return self._chunked

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token cross-entropy over the batch's scored tokens (``loss`` chooses how)."""
        if "position_ids" in batch and "attention_mask" not in batch and hasattr(self.model, VIRTUAL_TOKENS):
            # The virtual tokens go in front of a row and get an attention mask, which would undo the packing's
            # separation (transformers reads example boundaries from the position ids only without a mask).
            raise ValueError(
                "packed batches (ChatDataModule(pack=True)) cannot feed prompt, P- or prefix tuning: their virtual tokens "
                "would precede only a row's first example; set the data module's pack: false"
            )
        if self._uses_chunked_loss(batch):
            return causal_lm_loss(self.model, _model_inputs(batch), _token_labels(batch))
        return self(batch).loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = self._loss(batch)  # mean over the batch's predicted tokens
        # The model predicts token t+1 from tokens <= t: labels[:, 1:] are the scored targets.
        num_tokens = (_token_labels(batch)[:, 1:] != IGNORE_INDEX).sum()
        if num_tokens == 0:
            return  # nothing scored (the loss is 0/0); it must not count in the means
        self.val_loss.update(loss.float(), weight=num_tokens)
        self.val_perplexity.update(loss.float(), weight=num_tokens)
        self.log("val_loss", self.val_loss, prog_bar=True)
        self.log("val_perplexity", self.val_perplexity, prog_bar=True)


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a causal LM reads from a batch: packed batches (:mod:`lightning_peft.recipes.packing`) carry
    ``position_ids`` and no ``attention_mask``."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if batch.get(k) is not None}


def _token_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The language-modelling targets of a batch. A classification batch (one class label per example, as an
    inference-time intervention is fitted on) is scored as text: its own tokens, padding masked out."""
    labels = batch["labels"]
    if labels.ndim == 2:
        return labels
    mask = batch.get("attention_mask")
    return batch["input_ids"] if mask is None else batch["input_ids"].masked_fill(mask == 0, IGNORE_INDEX)


class SequenceClassificationTask(_TransformersTask):
    """Sequence classification with any ``AutoModelForSequenceClassification``.

    The classification head is new (randomly initialised): with LoRA, train it in full with
    ``LoRA(..., modules_to_save=["classifier"])`` (the head's name depends on the architecture: BERT
    ``classifier``, Llama ``score``).

    Args:
        model_name_or_path: Hub id or directory of the model (and its tokenizer).
        num_labels: number of classes (>= 2).
        dtype: dtype the base weights are loaded in.
        optimizer: called with the trainable parameters. Default AdamW, lr 2e-4.
        lr_scheduler: called with the optimizer, stepped every optimizer step.
        quantization: load the base straight into k-bit (QLoRA); the new head stays in ``dtype``.
        param_groups: per-group learning rates (:class:`~lightning_peft.operations.param_groups.ParamGroups`): LoRA+
            ``loraplus_ratio`` and/or layer-wise ``layer_decay`` (the head, after the last block, keeps the
            optimizer's lr), e.g. ``{loraplus_ratio: 16, layer_decay: 0.8}`` from YAML.
        compile: ``torch.compile`` each transformer block in place after injection.

    Example::

        model = SequenceClassificationTask("sentence-transformers/all-MiniLM-L6-v2", num_labels=2)
    """

    def __init__(
        self,
        model_name_or_path: str,
        num_labels: int = 2,
        dtype: DType = "float32",
        optimizer: OptimizerCallable = lambda p: torch.optim.AdamW(p, lr=2e-4),
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        quantization: Optional[Quantization] = None,
        param_groups: Optional[ParamGroups] = None,
        compile: bool = False,
    ) -> None:
        super().__init__(model_name_or_path, dtype, optimizer, lr_scheduler, quantization, param_groups, compile)
        if not isinstance(num_labels, int) or num_labels < 2:
            raise ValueError(f"num_labels must be an integer >= 2 (1 would make transformers regress), got {num_labels!r}")
        self.save_hyperparameters(ignore=_unpicklable(optimizer=optimizer, lr_scheduler=lr_scheduler))
        self.num_labels = num_labels
        self.val_loss = MeanMetric()  # example-weighted mean loss
        self.val_accuracy = MulticlassAccuracy(num_classes=num_labels, average="micro")

    def configure_base_model(self) -> nn.Module:
        from transformers import AutoModelForSequenceClassification

        model = self._from_pretrained(AutoModelForSequenceClassification, num_labels=self.num_labels)
        if getattr(model.config, "pad_token_id", None) is None:
            # Decoder models (Llama, GPT-2) find the last real token through pad_token_id; batches are padded.
            tokenizer = self.tokenizer
            if tokenizer is None:
                raise ValueError(f"{self.model_name_or_path!r} sets no pad_token_id and has no tokenizer to take it from")
            model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return model.train()  # from_pretrained returns eval mode (dropout off); see CausalLMTask

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(batch).loss
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        output = self(batch)
        self.val_loss.update(output.loss.float(), weight=batch["labels"].shape[0])
        self.val_accuracy.update(output.logits.argmax(dim=-1), batch["labels"])
        self.log("val_loss", self.val_loss, prog_bar=True)
        self.log("val_accuracy", self.val_accuracy, prog_bar=True)
