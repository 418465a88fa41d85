"""``PEFTMixin``: PEFT for LightningModules that build their model in ``configure_model``.

Building in ``configure_model`` is how large models are made under FSDP or on the meta device. The
mixin owns ``configure_model`` and runs, in order:

1. :meth:`configure_base_model` (yours): build and return the base model;
2. inject the PEFT method and freeze the base;
3. :meth:`parallelize` (yours, optional): shard or compile, now that adapters exist, so ``fully_shard``
   sees them as ordinary parameters of each block.

Example::

    class MyTask(PEFTMixin, L.LightningModule):
        def __init__(self):
            super().__init__()
            self.peft_method = LoRA(r=8, target_modules=["q_proj", "v_proj"])  # or via PEFTCallback

        def configure_base_model(self):
            return AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M")

Checkpoints are adapter-only. ``load_from_checkpoint`` rebuilds the base, re-injects the adapters from
the method stored in the checkpoint, checks the base fingerprint and loads the trained tensors. If you
override ``on_save_checkpoint``/``on_load_checkpoint``, call ``super()``.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_peft.core.injection import injected_method
from lightning_peft.integration.checkpoints import (
    CHECKPOINT_KEY,
    adapter_state_names,
    checkpoint_metadata,
    restore_training_state,
    verify_checkpoint,
)
from lightning_peft.integration.pipeline import prepare_for_training
from lightning_peft.integration.strategies import configure_fsdp1
from lightning_peft.methods.base import PEFTMethod, method_from_dict


class PEFTMixin:
    """Mix in before ``LightningModule``: ``class Task(PEFTMixin, L.LightningModule)``."""

    #: Attribute that holds the model built by :meth:`configure_base_model`.
    peft_model_attr: str = "model"
    #: The method to inject; set it in ``__init__`` or let ``PEFTCallback`` set it.
    peft_method: PEFTMethod | None = None
    #: Quantize the base in place before injection (set by ``PEFTCallback(quantization=...)``).
    peft_quantization: Any = None
    _peft_quantization_device: Any = None
    _peft_parallelized = False

    # -- hooks for the user -----------------------------------------------------------------------
    def configure_base_model(self) -> nn.Module:
        """Build and return the base model (called once, from ``configure_model``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement configure_base_model() to use PEFTMixin")

    def parallelize(self) -> None:
        """Shard/compile the adapted model (e.g. ``fully_shard`` per block). Called once, after injection."""

    # -- what the mixin does ----------------------------------------------------------------------
    @property
    def peft_model(self) -> nn.Module | None:
        return getattr(self, self.peft_model_attr, None)

    def configure_model(self) -> None:
        if self.peft_model is None:
            setattr(self, self.peft_model_attr, self.configure_base_model())
        self._apply_peft_method()
        if not self._peft_parallelized:
            self.parallelize()
            self._peft_parallelized = True

    def use_peft_method(self, method: PEFTMethod) -> None:
        """Set the method (called by ``PEFTCallback.setup``); injects at once if the model exists."""
        if self.peft_method is not None and self.peft_method != method:
            raise ValueError(f"{type(self).__name__} already uses {self.peft_method!r}; PEFTCallback asks for {method!r}")
        self.peft_method = method
        if self.peft_model is not None:
            if self._peft_parallelized and injected_method(self.peft_model) is None:
                raise RuntimeError(
                    "the model was already parallelized (sharded) without adapters; injecting now would leave "
                    "the adapters unsharded and unsynchronised. Set peft_method before configure_model runs."
                )
            self._apply_peft_method()

    def use_quantization(self, quantization: Any, device: Any = None) -> None:
        """Quantize the base before injection (called by ``PEFTCallback.setup`` before :meth:`use_peft_method`)."""
        if self.peft_quantization is not None and self.peft_quantization != quantization:
            raise ValueError(f"{type(self).__name__} already uses {self.peft_quantization}; PEFTCallback asks for {quantization}")
        self.peft_quantization = quantization
        self._peft_quantization_device = device

    def _apply_peft_method(self) -> None:
        if self.peft_method is None:
            return
        first_time = injected_method(self.peft_model) is None
        # Before the user's parallelize(): FSDP2 shards whatever each rank holds and never broadcasts.
        prepare_for_training(
            self, self.peft_model, self.peft_method, self.peft_quantization, self._peft_quantization_device, checkpoint_hooks=False  # type: ignore[arg-type]
        )
        trainer = getattr(self, "_trainer", None)
        if first_time and trainer is not None:  # in a Trainer without PEFTCallback: FSDP1 has not wrapped yet
            configure_fsdp1(trainer.strategy, self.peft_model)

    # Adapter-only checkpoints lack the frozen weights by design; on_load_checkpoint checks what must be there.
    @property
    def strict_loading(self) -> bool:
        return False

    @strict_loading.setter
    def strict_loading(self, value: bool) -> None:
        if value:
            raise ValueError("PEFTMixin modules load adapter-only checkpoints; strict_loading must stay False")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.peft_model is not None and injected_method(self.peft_model) is not None:
            checkpoint[CHECKPOINT_KEY] = checkpoint_metadata(self.peft_model)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        metadata = checkpoint.get(CHECKPOINT_KEY)
        if self.peft_model is None:
            return
        # No metadata (e.g. a full fine-tune's checkpoint) still goes through verify_checkpoint: with
        # strict_loading off, it is what refuses a checkpoint that lacks this model's adapter tensors.
        if metadata and injected_method(self.peft_model) is None and metadata.get("method"):
            # load_from_checkpoint: the method came from a PEFTCallback that is not here now.
            self.peft_method = method_from_dict(metadata["method"])
            if self._peft_parallelized and type(self).parallelize is not PEFTMixin.parallelize:
                # load_from_checkpoint ran configure_model (and so parallelize) before this hook could say
                # which method to inject. Harmless for a parallelize that is a no-op outside a Trainer
                # (no device mesh); say so rather than silently leave adapters outside the sharding.
                rank_zero_warn(
                    f"{type(self).__name__}: injecting {type(self.peft_method).__name__} from the checkpoint after "
                    f"parallelize() already ran (the method came from a PEFTCallback). If parallelize sharded or "
                    f"compiled the model, set peft_method in __init__ so configure_model injects first."
                )
            self._apply_peft_method()
        verify_checkpoint(checkpoint, self, self.peft_model)  # type: ignore[arg-type]
        restore_training_state(checkpoint, self)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load as usual, but leave the frozen base out of ``missing_keys``: it is absent from adapter-only
        checkpoints by design, and reporting every frozen key buries any real problem (verify_checkpoint
        has already checked that every trainable tensor is there)."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)  # type: ignore[misc]
        adapter_state = adapter_state_names(self)  # type: ignore[arg-type]
        result.missing_keys[:] = [key for key in result.missing_keys if key in adapter_state]
        return result
