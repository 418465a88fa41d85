"""Getting a k-bit model ready to train adapters, and refusing setups known to fail.

The QLoRA recipe (arXiv:2305.14314, and what peft's ``prepare_model_for_kbit_training`` does):

- **Norms in float32.** Their weights are few and rescale every hidden state; in 16 bits the
  normalisation's rounding error compounds through the layers. A float32 norm makes float32 hidden
  states, which bitsandbytes layers accept (they cast to their compute dtype) but a 16-bit layer left
  unquantized -- the output head -- does not: those get their input cast to their own dtype.
- **Gradient checkpointing** to fit long sequences, and the *input* of the first checkpointed block
  must require grad. With the embeddings frozen nothing before the first block does, and reentrant
  checkpointing (``torch.utils.checkpoint(use_reentrant=True)``) then skips the backward of every
  block: the adapters silently get no gradient. We default to non-reentrant checkpointing (which does
  not have that failure) and also make the embedding output require grad, so reentrant works too.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_peft.core.transformers_compat import checkpointing_enabled, disable_checkpointing, enable_checkpointing
from lightning_peft.quantization.config import Quantization

_NORM_SUFFIXES = ("RMSNorm", "LayerNorm")


def _is_norm(module: nn.Module) -> bool:
    # Llama-family norms are model-specific classes (LlamaRMSNorm, Qwen2RMSNorm, ...), hence the names.
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or type(module).__name__.endswith(_NORM_SUFFIXES)


def upcast_norms(model: nn.Module) -> list[str]:
    """Cast the parameters of every normalisation layer to float32 in place; returns the layers' names."""
    names = []
    for name, module in model.named_modules():
        if not _is_norm(module):
            continue
        for param in module.parameters(recurse=False):
            if param.is_floating_point() and param.dtype != torch.float32:
                param.data = param.data.float()  # same Parameter object: references to it stay valid
        names.append(name)
    return names


def _cast_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    dtype = module.weight.dtype
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != dtype else a for a in args)


def cast_inputs_of_16bit_linears(model: nn.Module) -> list[str]:
    """Make every full-precision ``nn.Linear`` with a 16-bit weight cast its input to that dtype (idempotent)."""
    from lightning_peft.quantization.replace import is_quantized_linear

    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or is_quantized_linear(module) or module.weight.dtype not in (torch.float16, torch.bfloat16):
            continue
        if not getattr(module, "_lightning_peft_casts_input", False):
            module.register_forward_pre_hook(_cast_input)
            module._lightning_peft_casts_input = True
        names.append(name)
    return names


def uses_reentrant_checkpointing(model: nn.Module) -> bool:
    """Whether transformers' gradient checkpointing is on with ``use_reentrant=True`` (torch's old default)."""
    if not checkpointing_enabled(model):
        return False
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if func is not None:
            return bool(getattr(func, "keywords", {}).get("use_reentrant", True))
    return False


def prepare_model_for_kbit_training(model: nn.Module, gradient_checkpointing: bool | None = None, use_reentrant: bool = False) -> nn.Module:
    """Norms to float32; optionally turn on gradient checkpointing; make checkpointing work with frozen
    embeddings. ``gradient_checkpointing=None`` leaves the model's setting as it is. Idempotent.

    Example::

        model = load_quantized("assets/smollm2-135m-instruct", Quantization(bits=4))
        prepare_model_for_kbit_training(model, gradient_checkpointing=True)
    """
    upcast_norms(model)
    cast_inputs_of_16bit_linears(model)
    if gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"{type(model).__name__} does not support gradient checkpointing (transformers' supports_gradient_checkpointing)")
        enable_checkpointing(model, use_reentrant)
    elif gradient_checkpointing is False and checkpointing_enabled(model):
        disable_checkpointing(model)
    if checkpointing_enabled(model) and getattr(model, "_require_grads_hook", None) is None:
        if not hasattr(model, "enable_input_require_grads"):
            raise ValueError(f"{type(model).__name__} has gradient checkpointing on but no input embeddings to make require grad")
        model.enable_input_require_grads()
    return model


def check_trainer_compatibility(trainer: Any, quantization: Quantization, model: nn.Module | None = None) -> None:
    """Raise for Trainer setups known to fail with a k-bit base; warn for ones that silently degrade."""
    from lightning.pytorch.plugins.precision import BitsandbytesPrecision
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


def quantize_for_training(model: nn.Module, quantization: Quantization, device: Any = None) -> None:
    """Quantize ``model`` in place (idempotent) and prepare it for k-bit training (norms in float32):
    what ``PEFTCallback(quantization=...)`` does before injecting the adapters."""
    from lightning_peft.quantization.replace import quantize_model

    names = quantize_model(model, quantization, device=device)
    prepare_model_for_kbit_training(model)
    rank_zero_info(f"lightning_peft: {len(names)} linear layers quantized to {quantization.describe()}")
