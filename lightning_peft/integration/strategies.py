"""Every rule that depends on the Trainer's strategy, in one place.

Each check here is a failure that would otherwise surface late (mid-step, at the first checkpoint) or not
at all (ranks silently training different adapters). Adding a strategy means reading this module only:

- a strategy we have not built for: the package knows how each of Lightning's single-device, DDP, FSDP,
  FSDP2 (``ModelParallelStrategy``) and DeepSpeed strategies treats frozen parameters and checkpoints;
  another one (a custom subclass of ``Strategy``, XLA) gets an error rather than a guess;
- a model that is already sharded when the adapters are injected: FSDP has flattened or distributed
  the base's parameters, so new adapter parameters would sit outside the sharding, unsynchronised;
- DDP with ``find_unused_parameters=True`` and reentrant gradient checkpointing, which fails in backward
  with "Expected to mark a variable ready only once";
- a method that runs different modules at each step (LayerDrop, :func:`allow_per_step_graphs`): DDP must then
  find unused parameters, and sharded strategies are refused;
- a merged export under a strategy that holds slices of the base (:func:`check_merged_export`);
- a k-bit base under a strategy or precision that would destroy or cannot shard it
  (:func:`check_trainer_compatibility`);
- FSDP1's wrap units and meta-device materialisation (:func:`configure_fsdp1`, planned by
  :mod:`lightning_peft.integration.fsdp_wrapping`); rank-0-only loading (:func:`loads_on_rank0_only`);
  data-driven initialisation needing whole parameters on every rank (:func:`shards_parameters`);
- (a warning) ``ModelCheckpoint(save_last=True)`` with sharded checkpoints: Lightning rewrites the ``last.ckpt``
  directory in place, so a kill while it is written leaves the previous step's ``meta.pt`` beside the new
  step's shards, a checkpoint that loads and resumes the wrong state. ``save_last="link"`` points
  ``last.ckpt`` at the newest complete checkpoint instead.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lightning.pytorch.plugins.precision import BitsandbytesPrecision
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_peft.core.sharding import is_sharded
from lightning_peft.integration.distributed import on_any_rank
from lightning_peft.integration.fsdp_wrapping import AdapterWrapPolicy
from lightning_peft.quantization.config import Quantization
from lightning_peft.quantization.prepare import uses_reentrant_checkpointing

SUPPORTED_STRATEGIES = (SingleDeviceStrategy, DDPStrategy, FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy)


SUPPORTED_DESCRIPTION = "'auto'/single device, 'ddp' (and ddp_spawn/ddp_notebook), 'fsdp', ModelParallelStrategy (FSDP2) or 'deepspeed'"


def check_strategy(trainer: Any, model: nn.Module | None) -> None:
    """Raise ``ValueError`` for an unsupported strategy or a combination known to fail (see module docstring)."""
    strategy = trainer.strategy
    if not isinstance(strategy, SUPPORTED_STRATEGIES):
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


def allow_per_step_graphs(trainer: Any, model: nn.Module | None, method: Any) -> None:
    """Prepare the strategy for a method whose steps run different modules (LayerDrop skips layers).

    DDP's reducer waits for a gradient of every trainable parameter unless ``find_unused_parameters`` is on; with
    it on, the parameters of the layers every rank skipped (each rank draws the same) are marked ready without one.
    Reentrant gradient checkpointing cannot run with that flag (see :func:`check_strategy`). Sharded strategies
    gather each layer's parameters in its forward and reduce them in its backward, hook by hook; a layer that does
    not run breaks that schedule (the failures fairseq and DeepSpeed users report), so they are refused.
    """
    if not getattr(method, "changes_graph_per_step", False):
        return
    strategy = trainer.strategy
    if shards_parameters(strategy):
        raise ValueError(
            f"{method!r} runs different layers at each step, which {type(strategy).__name__} (sharded parameters, gathered "
            f"and reduced layer by layer) cannot follow; use DDP or one device"
        )
    if isinstance(strategy, DDPStrategy):
        if model is not None and uses_reentrant_checkpointing(model):
            raise ValueError(
                f"{method!r} needs DDP(find_unused_parameters=True) (a skipped layer's parameters get no gradient), which fails "
                f"with reentrant gradient checkpointing; use model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
                f"{{'use_reentrant': False}})"
            )
        kwargs = getattr(strategy, "_ddp_kwargs", None)
        if isinstance(kwargs, dict) and not kwargs.get("find_unused_parameters"):
            kwargs["find_unused_parameters"] = True  # DDP wraps after setup: the flag still takes effect
            rank_zero_info(f"lightning_peft: DDP find_unused_parameters=True for {type(method).__name__} (skipped layers get no gradient)")


def run_unwrapped_when_nothing_trains(trainer: Any, method: Any) -> None:
    """Let DDP run a method that trains no tensor (inference-time intervention, fitted from data at fit start).

    DDP's wrapper exists to all-reduce gradients, and torch refuses to build one for a module with no trainable
    parameter. With nothing to reduce, the module runs unwrapped on each rank; the process group the strategy set up
    still carries the method's own all-reduces (its statistics) and Lightning's. Only this strategy instance changes.
    """
    if getattr(method, "trains_parameters", True) or not isinstance(trainer.strategy, DDPStrategy):
        return
    trainer.strategy._setup_model = lambda model: model  # DDPStrategy.configure_ddp wraps through this hook


def check_merged_export(trainer: Any, export_merged: bool) -> None:
    """A merged export needs every base weight whole on the writing rank; sharded strategies hold slices.

    Gathering the whole base to rank 0 at every export would cost what sharding saves (and FSDP1's full state
    dict is a collective the other ranks would not join from inside rank 0's export), so it is refused at
    ``setup``, with the way that works: export the adapter, then merge in one process.
    """
    strategy = trainer.strategy
    zero3 = isinstance(strategy, DeepSpeedStrategy) and isinstance(strategy.config, dict) and strategy.zero_stage_3
    if export_merged and (isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)) or zero3):
        raise ValueError(
            f"export_merged=True under {type(strategy).__name__}{' (ZeRO-3)' if zero3 else ''}: the base weights are "
            f"sharded across ranks. Export the adapter (export_merged=False) and merge it afterwards in one process: "
            f"load_adapter(base, 'adapter_dir') then lightning_peft.formats.merged.save_merged(model, 'merged_dir')"
        )


def writes_sharded_checkpoints(strategy: Any) -> bool:
    """Whether ``strategy`` saves a checkpoint as a directory of per-rank shards (FSDP2's default; FSDP1 with
    ``state_dict_type="sharded"``)."""

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


def check_trainer_compatibility(trainer: Any, quantization: Quantization, model: nn.Module | None = None) -> None:
    """Raise for Trainer setups known to fail with a k-bit base; warn for ones that silently degrade."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    if isinstance(trainer.precision_plugin, BitsandbytesPrecision):
        raise ValueError(
            "Trainer(plugins=BitsandbytesPrecision(...)) quantizes every nn.Linear, the LoRA adapters included, "
            "so nothing would train in full precision; use PEFTCallback(quantization=Quantization(...)) alone"
        )
    precision = str(trainer.precision)
    true_dtypes = {"16-true": torch.float16, "bf16-true": torch.bfloat16, "64-true": torch.float64}
    if precision in true_dtypes:
        dtype = true_dtypes[precision]
        if quantization.bits == 4 and quantization.quant_storage != "uint8" and quantization.torch_quant_storage != dtype:
            # Module.to(dtype) converts floating tensors, and the packed codes are one: their bits are lost.
            raise ValueError(
                f"precision={precision!r} casts every floating tensor to {dtype}, which destroys 4-bit weights stored as "
                f"quant_storage={quantization.quant_storage!r}; use precision='{precision.split('-')[0]}-mixed' or "
                f"quant_storage={str(dtype).removeprefix('torch.')!r}"
            )
        rank_zero_warn(
            f"precision={precision!r} casts the float32 LoRA adapters and norms to {dtype}; QLoRA keeps them in float32. "
            f"Prefer precision='bf16-mixed' (or '32-true' on CPU)."
        )
    strategy = trainer.strategy
    if isinstance(strategy, FSDPStrategy):
        if quantization.bits == 8:
            raise ValueError("FSDP cannot shard LLM.int8 (bits=8) weights; use bits=4 with quant_storage set to the compute dtype")
        if quantization.quant_storage == "uint8":
            raise ValueError(
                f"FSDP shards one float dtype per unit and cannot mix uint8 4-bit codes with {quantization.compute_dtype} "
                f"weights: set Quantization(quant_storage={quantization.compute_dtype!r})"
            )
        param_dtype = fsdp_param_dtype(strategy, precision)
        if param_dtype is not None and quantization.torch_quant_storage != param_dtype:
            # FSDP casts each flat parameter to param_dtype for the forward pass; the packed 4-bit codes would be
            # converted as numbers, and their bytes (what bitsandbytes reads) would no longer be the codes.
            name = str(param_dtype).removeprefix("torch.")
            raise ValueError(
                f"Quantization(quant_storage={quantization.quant_storage!r}) does not match FSDP's param_dtype {name} "
                f"(precision={precision!r}); set quant_storage={name!r}, or a precision whose FSDP param_dtype is "
                f"{quantization.quant_storage}"
            )
    if isinstance(strategy, DeepSpeedStrategy) and getattr(strategy, "zero_stage_3", False):
        raise ValueError("DeepSpeed ZeRO-3 cannot partition bitsandbytes k-bit weights; use ZeRO-2, DDP or FSDP with 4-bit")


def fsdp_param_dtype(strategy: Any, precision: str) -> torch.dtype | None:
    """The dtype Lightning's FSDPStrategy gives FSDP's ``MixedPrecision(param_dtype=...)``: the user's
    ``mixed_precision`` if set, else the one its precision plugin derives from ``precision``."""
    configured = getattr(strategy, "mixed_precision", None)  # FSDPStrategy(mixed_precision=MixedPrecision(...))
    if configured is not None and configured.param_dtype is not None:
        return configured.param_dtype
    by_precision = {"16-true": torch.float16, "16-mixed": torch.float16, "bf16-true": torch.bfloat16, "bf16-mixed": torch.bfloat16, "32-true": torch.float32}
    return by_precision.get(precision)


def configure_fsdp1(strategy: Any, model: nn.Module | None = None) -> None:
    """Prepare Lightning's ``FSDPStrategy`` for an adapted model, before it wraps (``Callback.setup`` and
    ``configure_model`` run before; idempotent; other strategies are left alone):

    - the adapter-aware policy, wrapping the one the strategy was given;
    - for a ``model`` whose parameters are (partly) on the meta device, as other ranks' are after a rank-0-only
      load (:mod:`lightning_peft.quantization.rank0_loading`): ``param_init_fn`` allocates each unit's parameters
      on the rank's device and ``sync_module_states`` copies rank 0's values into them, unit by unit.
    """
    if not isinstance(strategy, FSDPStrategy):
        return
    # Rank 0 holds real weights and the others meta ones: all must agree to sync, or their collectives differ.
    if model is not None and on_any_rank(any(param.is_meta for param in model.parameters())):
        strategy.kwargs["sync_module_states"] = True
        strategy.kwargs.setdefault("param_init_fn", MaterializeOn(strategy.root_device))
    current = strategy.kwargs.get("auto_wrap_policy")
    if isinstance(current, AdapterWrapPolicy):
        return
    strategy.kwargs["auto_wrap_policy"] = AdapterWrapPolicy(current)
    fsdp_logger = logging.getLogger("torch.distributed.fsdp._state_dict_utils")
    if not any(isinstance(f, _FrozenKeysAbsentByDesign) for f in fsdp_logger.filters):
        fsdp_logger.addFilter(_FrozenKeysAbsentByDesign())


class _FrozenKeysAbsentByDesign(logging.Filter):
    """Loading a sharded adapter-only checkpoint, FSDP1 warns once per frozen parameter (hundreds of lines)
    that it is not in the state dict. It never is, by design; a missing *adapter* tensor still fails, in the
    distributed checkpoint's own load, which is asked for exactly the adapter keys."""
    def filter(self, record: logging.LogRecord) -> bool:
        return "Did not find param with FQN" not in record.getMessage()


class MaterializeOn:
    """FSDP1's ``param_init_fn``: allocate a module's own meta parameters and buffers, uninitialised, on ``device``
    (``sync_module_states`` then fills them from rank 0). A class rather than a closure, so it pickles."""
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, module: nn.Module) -> None:
        module.to_empty(device=self.device, recurse=False)


def shards_parameters(strategy: Any) -> bool:
    """Whether ``strategy`` may hold a slice of a parameter on each rank (FSDP1, FSDP2, DeepSpeed): then a rule
    that needs whole weights on every rank (LoRA-GA's gradient estimate) cannot run."""
    return isinstance(strategy, (FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy))


def loads_on_rank0_only(strategy: Any) -> bool:
    """Whether only rank 0 needs to read and quantize the base: FSDP1 fills the other ranks' empty (meta) models
    from rank 0 when it wraps (``sync_module_states``, set up by :func:`configure_fsdp1`)."""
    return isinstance(strategy, FSDPStrategy)
